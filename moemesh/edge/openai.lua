-- OpenAI compatibility at the edge, between the HTTP client and grpc_json_transcoder. moemesh/edge/lua.py prepends
-- the field tables TOP, MESSAGE and STREAM_OPTIONS (JSON name -> kind of every field the moemesh.v1 request messages
-- declare: "string", "number", "bool", "list", "object", "any") and json_walk.lua (inspect_body, json_string).
--
-- Request (POST /v1/chat/completions[:stream], /v1/completions[:stream] (table COMPLETION); gRPC untouched):
--   * a content-type other than application/json is 415, a body that is not UTF-8 400 (one line each: the
--     transcoder would answer the first as if valid and the second with its parser's raw text);
--   * one walk over the buffered body rejects fields the API does not declare (the transcoder would drop them
--     silently) and values of the wrong kind (its messages would not name the field) with 400 naming the field,
--     and reads `stream` and `stream_options.include_usage`;
--   * "stream": true moves the call to /v1/chat/completions:stream (StreamChatCompletion), so both modes share
--     OpenAI's one path. A body that is not a JSON object is refused here; finer errors are the transcoder's.
-- Response:
--   * a gRPC error the transcoder converted (convert_grpc_status: {"code":N,"message":"..."}) becomes OpenAI's
--     {"error":{"message","type","param","code"}}; retry-after-ms also becomes retry-after (seconds);
--   * a stream gets SSE headers and a final "data: [DONE]" after its last chunk (finish, usage or in-band error).
-- Envoy's own errors (local replies) are shaped by the local reply mapper, which reads edge.param for `param`.

local NS = "moemesh.edge"
local CHAT = "/v1/chat/completions"
local STREAM = "/v1/chat/completions:stream"
local COMPLETIONS = "/v1/completions"
-- Path -> (field table, streaming path) of the POST endpoints whose bodies the walk checks.
local ENDPOINTS = { [CHAT] = { TOP, STREAM }, [STREAM] = { TOP, STREAM },
  [COMPLETIONS] = { COMPLETION, COMPLETIONS .. ":stream" }, [COMPLETIONS .. ":stream"] = { COMPLETION,
  COMPLETIONS .. ":stream" } }

-- Applies the walk's splices (in body order) to the text.
local function spliced(text, splices)
  table.sort(splices, function(a, b) return a[1] < b[1] end)
  local out, at = {}, 1
  for _, sp in ipairs(splices) do
    out[#out + 1] = text:sub(at, sp[1] - 1) .. sp[3]
    at = sp[2]
  end
  out[#out + 1] = text:sub(at)
  return table.concat(out)
end

local function reject(handle, field, message, status)
  if field then handle:streamInfo():dynamicMetadata():set(NS, "param", field) end
  handle:respond({ [":status"] = status or "400", ["content-type"] = "text/plain" }, message)
end

-- The chat body is JSON; a form or text body would otherwise reach the transcoder and be answered as if valid.
local function is_json(content_type)
  local media = (content_type or ""):lower():match("^%s*([^;%s]+)")
  return media == "application/json"
end

-- Index of the first byte that is not part of valid UTF-8 (RFC 3629: no overlongs, surrogates or > U+10FFFF), or
-- nil. ASCII bodies take one string.find; the loop only starts at the first byte >= 0x80.
local function utf8_error(s)
  local i = s:find("[\128-\255]")
  while i do
    local c, n, lo, hi = s:byte(i), 0, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then n = 1
    elseif c >= 0xE0 and c <= 0xEF then
      n = 2
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      n = 3
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    else return i end
    for k = 1, n do
      local b = s:byte(i + k)
      if not b or b < (k == 1 and lo or 0x80) or b > (k == 1 and hi or 0xBF) then return i end
    end
    i = s:find("[\128-\255]", i + n + 1)
  end
  return nil
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

-- Envoy's codec accepts headers up to CODEC_HEADERS_KB (moemesh/edge/http.py) so that oversized metadata reaches
-- this filter and gets an answer: a gRPC status (RESOURCE_EXHAUSTED, trailers-only) or HTTP 431, instead of the
-- HTTP/2 stream reset the codec gives beyond its limit. Counted as HPACK does: name + value + 32 per header.
local function oversized(handle, headers, grpc)
  local total = 0
  for key, value in pairs(headers) do total = total + #key + #value + 32 end
  if total <= MAX_HEADERS_BYTES then return false end
  local message = string.format("metadata: %d KiB of headers exceed the %d KiB limit (Request Header Fields Too "
    .. "Large); send less", math.ceil(total / 1024), math.floor(MAX_HEADERS_BYTES / 1024))
  if grpc then
    handle:respond({ [":status"] = "200", ["content-type"] = "application/grpc", ["grpc-status"] = "8",
                     ["grpc-message"] = message }, "")
  else
    reject(handle, nil, message, "431")
  end
  return true
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local grpc = (headers:get("content-type") or ""):find("^application/grpc") ~= nil
  if oversized(handle, headers, grpc) then return end
  if grpc then return end
  drop_grpc_headers(headers)
  if headers:get(":method") ~= "POST" then return end
  local path = headers:get(":path") or ""
  local base, query = path:match("^([^?]*)(.*)$")
  local endpoint = ENDPOINTS[base]
  if not endpoint then return end
  if not is_json(headers:get("content-type")) then
    return reject(handle, nil, "content-type: " .. (headers:get("content-type") or "missing") .. " is not supported; "
      .. "send the body as application/json", "415")
  end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  headers = handle:headers()  -- a wrapper taken before body() is stale once the script resumes
  local bad_byte = utf8_error(text)
  if bad_byte then
    return reject(handle, nil, string.format("body: not valid UTF-8 (byte 0x%02x at offset %d); JSON must be "
      .. "UTF-8", text:byte(bad_byte), bad_byte - 1))
  end
  local found = inspect_body(text, endpoint[1])
  if not found then
    return reject(handle, nil, "body: not a valid JSON object (or nested deeper than " .. MAX_DEPTH .. " levels)")
  end
  if found.bad then
    return reject(handle, found.bad, found.bad .. ": " .. (found.why or "unknown field; moemesh's chat-completion "
      .. "API does not declare it (remove it)"))
  end
  if #found.splices > 0 then
    body:setBytes(spliced(text, found.splices))
    headers = handle:headers()
    headers:remove("content-length")
  end
  local meta = handle:streamInfo():dynamicMetadata()
  if base == endpoint[2] or found.stream then
    meta:set(NS, "stream", true)
    meta:set(NS, "include_usage", found.include_usage)
    meta:set(NS, "n", found.n)
    if base ~= endpoint[2] then headers:replace(":path", endpoint[2] .. query) end
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

-- {"code":3,"message":"max_tokens: -5 must be >= 1",...} -> OpenAI's error object (message kept as sent). `reason`:
-- the gateway's `error-code` metadata (e.g. context_length_exceeded), which is OpenAI's `code` where it is set.
local function openai_error(status, text, reason)
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
  if reason and reason:match("^[%w_]+$") then name = reason end
  local kind = TYPES[status] or (server and "server_error" or "invalid_request_error")
  return '{"error":{"message":' .. message .. ',"type":"' .. kind .. '","param":' .. param .. ',"code":"' .. name
    .. '"}}'
end

local function shape_error(handle, status)
  local body = handle:body(true)
  local text = body:getBytes(0, body:length())
  local headers = handle:headers()  -- taken after body(): an earlier wrapper is stale once the script resumes
  if text:find('^%s*{%s*"error"%s*:') then return end  -- already OpenAI's shape (the local reply mapper's)
  body:setBytes(openai_error(status, text, headers:get("error-code")))
  headers:replace("content-type", "application/json")
  local ms = tonumber(headers:get("retry-after-ms") or "")
  if ms and not headers:get("retry-after") then
    headers:replace("retry-after", tostring(math.max(1, math.ceil(ms / 1000))))
  end
end

-- The last chunk of a stream: usage when asked for, else the finish; an in-band error always. A key preceded by
-- '{' or ',' cannot be text inside a JSON string (its quote would be escaped there).
-- With n choices, the n-th finish is the last (`finished` counts them across chunks).
local function is_last(data, include_usage, n, finished)
  if data:find('[{,]"error":{') then return true, finished end
  if include_usage then return data:find('[{,]"usage":{') ~= nil, finished end
  for _ in data:gmatch('[{,]"finish_reason":"') do finished = finished + 1 end
  return finished >= n, finished
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
  local done, finished, last = false, 0, false
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if not done and n > 0 then
      last, finished = is_last(chunk:getBytes(0, n), meta.include_usage, meta.n or 1, finished)
    end
    if not done and last then
      chunk:setBytes(chunk:getBytes(0, n) .. "data: [DONE]\n\n")
      done = true
    end
  end
  local trailers = handle:trailers()
  if trailers then drop_grpc_headers(trailers) end
end
