-- A JSON walker for the edge's Lua filter (concatenated before openai.lua by moemesh/edge/lua.py, after the field
-- tables TOP, MESSAGE and STREAM_OPTIONS). It checks a request body's fields against those tables without building
-- the document: strings are skipped with string.find, so a megabyte prompt costs a few C calls. Not a validator of
-- every JSON detail (numbers and literals are only delimited): the transcoder parses for real afterwards; the walk
-- only has to accept every valid body and find what the transcoder would not name.

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
    j = on(unescape(raw), ws(s, j + 1), depth + 1, i)
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

-- Records in `found` the first field that is undeclared in `kinds` or of the wrong kind (its path and why).
local function judge(found, s, kinds, path, key, v)
  if found.bad then return end
  local kind = kinds[key]
  if not kind then
    found.bad = path
  elseif not kind_ok(kind, s, v) then
    found.bad, found.why = path, "must be " .. KINDS[kind]
  end
end

local function walk_messages(found, s, v, d)
  return elements(s, v, d, function(n, e, d2)
    local path = "messages[" .. n .. "]"
    if s:byte(e) ~= 123 then
      if not found.bad and literal(s, e) ~= "null" then found.bad, found.why = path, "must be an object" end
      return skip(s, e, d2)
    end
    return members(s, e, d2, function(key, w, d3, k)
      if key == "content" and s:byte(w) == 91 then  -- an array of parts: the transcoder takes it as content_parts
        found.splices[#found.splices + 1] = { k, w, '"content_parts":' }
        return skip(s, w, d3)
      end
      judge(found, s, MESSAGE, path .. "." .. key, key, w)
      return skip(s, w, d3)
    end)
  end)
end

local function walk_stream_options(found, s, name, v, d)
  return members(s, v, d, function(key, w, d2)
    judge(found, s, STREAM_OPTIONS, name .. "." .. key, key, w)
    if key == "include_usage" or key == "includeUsage" then found.include_usage = literal(s, w) == "true" end
    return skip(s, w, d2)
  end)
end

-- Walks the body against the field table `top`: the first undeclared or mistyped field (a JSON path and why), what
-- decides the RPC (stream, include_usage), and the rewrites the transcoder needs (`splices`: {from, to, text}
-- replacing bytes [from, to): a lone stop string wrapped in a list, a message's array `content` renamed
-- content_parts). nil when the body is not a JSON object.
local function inspect_body(s, top)
  local found = { bad = nil, why = nil, stream = false, include_usage = false, splices = {}, n = 1 }
  local i = ws(s, 1)
  if s:byte(i) ~= 123 then return nil end
  local last = members(s, i, 1, function(key, v, d)
    local c = s:byte(v)
    if key == "stop" and c == 34 then  -- OpenAI also takes one stop string: the walk wraps it in a list
      local j = skip(s, v, d)
      if j then found.splices[#found.splices + 1] = { v, j, "[" .. s:sub(v, j - 1) .. "]" } end
      return j
    end
    judge(found, s, top, key, key, v)
    if key == "stream" then found.stream = literal(s, v) == "true" end
    if key == "n" then found.n = math.max(1, math.floor(tonumber(literal(s, v)) or 1)) end
    if key == "messages" and c == 91 then return walk_messages(found, s, v, d) end
    if (key == "stream_options" or key == "streamOptions") and c == 123 then
      return walk_stream_options(found, s, key, v, d)
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
