-- OpenAI compatibility at the edge, between the HTTP client and grpc_json_transcoder (moemesh/edge/lua.py prepends
-- the tables TOP, MESSAGE and STREAM_OPTIONS: JSON name -> kind of every field the moemesh.v1 request messages
-- declare; kinds: "string", "number", "bool", "list", "object", "any").
--
-- Request (POST /v1/chat/completions[:stream], JSON only; gRPC passes untouched):
--   * one walk over the buffered body rejects fields the API does not declare (the transcoder would drop them
--     silently) and values of the wrong kind (its messages would not name the field) with 400 naming the field,
--     and reads `stream` and `stream_options.include_usage`;
--   * "stream": true moves the call to /v1/chat/completions:stream (StreamChatCompletion), so both modes share
--     OpenAI's one path. A body that is not valid JSON is left to the transcoder, which says what is wrong.
-- Response:
--   * a gRPC error the transcoder converted (convert_grpc_status: {"code":N,"message":"..."}) becomes OpenAI's
--     {"error":{"message","type","param","code"}}; retry-after-ms also becomes retry-after (seconds);
--   * a stream gets SSE headers and a final "data: [DONE]" after its last chunk (finish, usage or in-band error).
-- Envoy's own errors (local replies) are shaped by the local reply mapper, which reads edge.param for `param`.

local NS = "moemesh.edge"
local CHAT = "/v1/chat/completions"
local STREAM = "/v1/chat/completions:stream"
local MAX_DEPTH = 64

local function ws(s, i)
  return s:find("[^ \t\r\n]", i) or (#s + 1)
end

-- A string starting at i (s[i] == '"'): its raw text (escapes kept) and the index after it.
local function read_string(s, i)
  local j = i + 1
  while true do
    local q = s:find('["\\]', j)
    if not q then return nil end
    if s:byte(q) == 34 then return s:sub(i + 1, q - 1), q + 1 end
    j = q + 2
  end
end

local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- Decodes a key's escapes (a \u escape beyond ASCII stays as written: no declared name needs one).
local function unescape(raw)
  if not raw:find("\\", 1, true) then return raw end
  local out, i = {}, 1
  while i <= #raw do
    local c = raw:sub(i, i)
    if c ~= "\\" then
      out[#out + 1] = c
      i = i + 1
    elseif raw:sub(i + 1, i + 1) == "u" then
      local cp = tonumber(raw:sub(i + 2, i + 5), 16)
      out[#out + 1] = (cp and cp < 128) and string.char(cp) or raw:sub(i, i + 5)
      i = i + 6
    else
      local e = raw:sub(i + 1, i + 1)
      out[#out + 1] = ESCAPES[e] or e
      i = i + 2
    end
  end
  return table.concat(out)
end

local skip

-- Object at i: calls on(key, value_index) -> index after the value; returns the index after the object.
local function members(s, i, depth, on)
  if depth > MAX_DEPTH then return nil end
  i = ws(s, i + 1)
  if s:byte(i) == 125 then return i + 1 end
  while true do
    if s:byte(i) ~= 34 then return nil end
    local raw, j = read_string(s, i)
    if not raw then return nil end
    j = ws(s, j)
    if s:byte(j) ~= 58 then return nil end
    j = on(unescape(raw), ws(s, j + 1), depth + 1)
    if not j then return nil end
    j = ws(s, j)
    local c = s:byte(j)
    if c == 125 then return j + 1 end
    if c ~= 44 then return nil end
    i = ws(s, j + 1)
  end
end

-- Array at i: calls on(position, value_index) -> index after the value; returns the index after the array.
local function elements(s, i, depth, on)
  if depth > MAX_DEPTH then return nil end
  i = ws(s, i + 1)
  if s:byte(i) == 93 then return i + 1 end
  local n = 0
  while true do
    local j = on(n, i, depth + 1)
    if not j then return nil end
    j = ws(s, j)
    local c = s:byte(j)
    if c == 93 then return j + 1 end
    if c ~= 44 then return nil end
    n = n + 1
    i = ws(s, j + 1)
  end
end

-- Any value at i; returns the index after it (nil: not JSON).
skip = function(s, i, depth)
  local c = s:byte(i)
  if c == 34 then
    local _, j = read_string(s, i)
    return j
  elseif c == 123 then
    return members(s, i, depth, function(_, v, d) return skip(s, v, d) end)
  elseif c == 91 then
    return elements(s, i, depth, function(_, v, d) return skip(s, v, d) end)
  end
  local j = s:find("[,}%] \t\r\n]", i) or (#s + 1)
  if j == i then return nil end
  return j
end

local function literal(s, i)
  return s:sub(i, (s:find("[,}%] \t\r\n]", i) or (#s + 1)) - 1)
end

local KINDS = { list = "a list", object = "an object", string = "a string", bool = "true or false",
  number = "a number" }

-- Whether the JSON value at v has the field's kind (null always does: the field is then absent).
local function kind_ok(kind, s, v)
  local c = s:byte(v)
  if kind == "any" or c == nil then return true end
  local lit = (c ~= 34 and c ~= 123 and c ~= 91) and literal(s, v) or nil
  if lit == "null" then return true end
  if kind == "list" then return c == 91 end
  if kind == "object" then return c == 123 end
  if kind == "string" then return c == 34 end
  if kind == "bool" then return lit == "true" or lit == "false" end
  if kind == "number" then return c == 34 or (lit ~= nil and lit ~= "true" and lit ~= "false") end
  return true
end

-- Walks the body: the first undeclared or mistyped field (a JSON path and why), and what decides the RPC
-- (stream, include_usage). nil when the body is not a JSON object.
local function inspect_body(s)
  local found = { bad = nil, why = nil, stream = false, include_usage = false }
  local function judge(kinds, path, key, v)
    if found.bad then return end
    local kind = kinds[key]
    if not kind then
      found.bad = path
    elseif not kind_ok(kind, s, v) then
      found.bad, found.why = path, "must be " .. KINDS[kind]
      if key == "content" then found.why = found.why .. " (moemesh takes text content only)" end
    end
  end
  local function message_fields(prefix)
    return function(key, v, d)
      judge(MESSAGE, prefix .. key, key, v)
      return skip(s, v, d)
    end
  end
  local i = ws(s, 1)
  if s:byte(i) ~= 123 then return nil end
  local last = members(s, i, 1, function(key, v, d)
    local c = s:byte(v)
    if key == "stop" and c == 34 then  -- OpenAI also takes one stop string: the walk wraps it in a list
      local j = skip(s, v, d)
      found.stop_string = j and { v, j }
      return j
    end
    judge(TOP, key, key, v)
    if key == "stream" then found.stream = literal(s, v) == "true" end
    if key == "messages" and c == 91 then
      return elements(s, v, d, function(n, e, d2)
        local path = "messages[" .. n .. "]"
        if s:byte(e) ~= 123 then
          if not found.bad and literal(s, e) ~= "null" then found.bad, found.why = path, "must be an object" end
          return skip(s, e, d2)
        end
        return members(s, e, d2, message_fields(path .. "."))
      end)
    elseif (key == "stream_options" or key == "streamOptions") and c == 123 then
      return members(s, v, d, function(k, w, d2)
        judge(STREAM_OPTIONS, key .. "." .. k, k, w)
        if k == "include_usage" or k == "includeUsage" then found.include_usage = literal(s, w) == "true" end
        return skip(s, w, d2)
      end)
    end
    return skip(s, v, d)
  end)
  if not last or ws(s, last) <= #s then return nil end
  return found
end

-- A JSON string literal of any bytes: escapes, and U+FFFD for bytes that are not UTF-8.
local function json_string(text)
  local out = {}
  local i, n = 1, #text
  while i <= n do
    local c = text:byte(i)
    local len = (c < 0x80 and 1) or (c >= 0xC2 and c <= 0xDF and 2) or (c >= 0xE0 and c <= 0xEF and 3)
      or (c >= 0xF0 and c <= 0xF4 and 4) or 0
    local piece = len > 0 and text:sub(i, i + len - 1) or nil
    if len > 1 and (#piece ~= len or not piece:sub(2):match("^[\128-\191]+$")) then piece = nil end
    if piece == nil then
      out[#out + 1] = "\\ufffd"
      i = i + 1
    else
      if len == 1 then
        if c == 34 then piece = '\\"' elseif c == 92 then piece = "\\\\"
        elseif c < 32 or c == 127 then piece = string.format("\\u%04x", c) end
      end
      out[#out + 1] = piece
      i = i + len
    end
  end
  return '"' .. table.concat(out) .. '"'
end

local function reject(handle, field, message)
  if field then handle:streamInfo():dynamicMetadata():set(NS, "param", field) end
  handle:respond({ [":status"] = "400", ["content-type"] = "text/plain" }, message)
end

-- gRPC's reserved headers mean nothing on plain HTTP: dropped both ways (a client's grpc-timeout would otherwise
-- become the call's deadline, and the transcoder's grpc-status/grpc-message would leak to HTTP clients).
local function drop_grpc_headers(headers)
  local names = {}
  for key, _ in pairs(headers) do
    if key:sub(1, 5) == "grpc-" then names[#names + 1] = key end
  end
  for _, key in ipairs(names) do headers:remove(key) end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if (headers:get("content-type") or ""):find("^application/grpc") then return end
  drop_grpc_headers(headers)
  if headers:get(":method") ~= "POST" then return end
  local path = headers:get(":path") or ""
  local base, query = path:match("^([^?]*)(.*)$")
  if base ~= CHAT and base ~= STREAM then return end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  headers = handle:headers()  -- a wrapper taken before body() is stale once the script resumes
  local found = inspect_body(text)
  if not found then
    return reject(handle, nil, "body: not a valid JSON object (or nested deeper than " .. MAX_DEPTH .. " levels)")
  end
  if found.bad then
    return reject(handle, found.bad, found.bad .. ": " .. (found.why or "unknown field; moemesh's chat-completion "
      .. "API does not declare it (remove it)"))
  end
  if found.stop_string then
    local a, b = found.stop_string[1], found.stop_string[2]
    body:setBytes(text:sub(1, a - 1) .. "[" .. text:sub(a, b - 1) .. "]" .. text:sub(b))
    headers = handle:headers()
    headers:remove("content-length")
  end
  local meta = handle:streamInfo():dynamicMetadata()
  if base == STREAM or found.stream then
    meta:set(NS, "stream", true)
    meta:set(NS, "include_usage", found.include_usage)
    if base == CHAT then headers:replace(":path", STREAM .. query) end
  end
end

local TYPES = { [400] = "invalid_request_error", [401] = "authentication_error", [403] = "permission_error",
  [404] = "not_found_error", [409] = "conflict_error", [413] = "invalid_request_error",
  [429] = "rate_limit_exceeded", [501] = "not_implemented" }
local CODES = { [1] = "CANCELLED", [2] = "UNKNOWN", [3] = "INVALID_ARGUMENT", [4] = "DEADLINE_EXCEEDED",
  [5] = "NOT_FOUND", [6] = "ALREADY_EXISTS", [7] = "PERMISSION_DENIED", [8] = "RESOURCE_EXHAUSTED",
  [9] = "FAILED_PRECONDITION", [10] = "ABORTED", [11] = "OUT_OF_RANGE", [12] = "UNIMPLEMENTED", [13] = "INTERNAL",
  [14] = "UNAVAILABLE", [15] = "DATA_LOSS", [16] = "UNAUTHENTICATED" }

-- HTTP status -> code, for error bodies that carry none (the transcoder's own complaints).
local STATUS_CODES = { [400] = "INVALID_ARGUMENT", [401] = "UNAUTHENTICATED", [403] = "PERMISSION_DENIED",
  [404] = "NOT_FOUND", [413] = "REQUEST_TOO_LARGE", [429] = "RESOURCE_EXHAUSTED", [503] = "UNAVAILABLE",
  [504] = "DEADLINE_EXCEEDED" }

-- {"code":3,"message":"max_tokens: -5 must be >= 1",...} -> OpenAI's error object (message kept as sent).
local function openai_error(status, text)
  local code = tonumber(text:match('^%s*{%s*"code"%s*:%s*(%d+)') or "")
  local message
  local m = code and text:find('"message"%s*:%s*"')
  if m then
    local raw = read_string(text, text:find('"', text:find(":", m + 9, true), true))
    if raw then message = '"' .. raw .. '"' end
  end
  message = message or json_string(text ~= "" and text or ("HTTP " .. status))
  local field = message:match('^"([%w_%.%[%]]+): ')
  local param = (status == 400 and field) and ('"' .. field .. '"') or "null"
  local server = status >= 500
  local name = (code and CODES[code]) or STATUS_CODES[status] or (server and "INTERNAL" or "INVALID_ARGUMENT")
  local kind = TYPES[status] or (server and "server_error" or "invalid_request_error")
  return '{"error":{"message":' .. message .. ',"type":"' .. kind .. '","param":' .. param .. ',"code":"' .. name
    .. '"}}'
end

local function shape_error(handle, status)
  local body = handle:body(true)
  local text = body:getBytes(0, body:length())
  local headers = handle:headers()  -- taken after body(): an earlier wrapper is stale once the script resumes
  if text:find('^%s*{%s*"error"%s*:') then return end  -- already OpenAI's shape (the local reply mapper's)
  body:setBytes(openai_error(status, text))
  headers:replace("content-type", "application/json")
  local ms = tonumber(headers:get("retry-after-ms") or "")
  if ms and not headers:get("retry-after") then
    headers:replace("retry-after", tostring(math.max(1, math.ceil(ms / 1000))))
  end
end

-- The last chunk of a stream: usage when asked for, else the finish; an in-band error always. A key preceded by
-- '{' or ',' cannot be text inside a JSON string (its quote would be escaped there).
local function is_last(data, include_usage)
  if data:find('[{,]"error":{') then return true end
  if include_usage then return data:find('[{,]"usage":{') ~= nil end
  return data:find('[{,]"finish_reason":"') ~= nil
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if (headers:get("content-type") or ""):find("^application/grpc") then return end
  drop_grpc_headers(headers)
  local status = tonumber(headers:get(":status") or "") or 0
  if status >= 400 then return shape_error(handle, status) end
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if not (meta and meta.stream) or status ~= 200 then return end
  headers:replace("content-type", "text/event-stream")
  headers:replace("cache-control", "no-cache")
  headers:replace("x-accel-buffering", "no")
  local done = false
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if not done and n > 0 and is_last(chunk:getBytes(0, n), meta.include_usage) then
      chunk:setBytes(chunk:getBytes(0, n) .. "data: [DONE]\n\n")
      done = true
    end
  end
  local trailers = handle:trailers()
  if trailers then drop_grpc_headers(trailers) end
end
