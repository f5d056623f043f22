-- Response shaping for REST calls transcoded by Envoy (see envoy/README.md).
--
-- Runs AFTER the gRPC-JSON transcoder on responses (it is listed before it).
--   * Native gRPC calls (request content-type application/grpc*): untouched.
--   * REST call, response carries x-error-body (the server's trailing metadata,
--     turned into headers for a trailers-only error): :status from
--     x-http-status, body = x-error-body verbatim, content-type JSON.
--     If the server sent response headers before failing, x-error-body comes
--     in the trailers and there is no body to fill: only the status is set.
--   * REST call, other non-zero grpc-status (an error the server did not
--     shape, e.g. gRPC's own limits, or Envoy's upstream failures, which reach
--     here as gRPC statuses): generic {"error": <its title>, "message":
--     <grpc-message>, "request_id": <x-request-id>} body; a 429 also gets
--     "retry_after": 1 and Retry-After: 1, as the contract promises.
--   * REST 400 from Envoy itself (the transcoder, or this filter, refused the
--     request; the local_reply_config mapper gave it the documented body with
--     a generic "details"): details names the field the message is about, or
--     "body" when the JSON does not parse.
--   * REST success: strip grpc-* headers that would leak.
-- Envoy's Lua has no JSON library: escaping is done by hand below.

local META_NS = "convergence.error_body"

-- Internal headers never shown to REST clients. retry-after is kept.
local STRIP = {
  "x-error-body", "x-http-status",
  "grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding",
}

-- The "error" title of each HTTP status, from the ErrorReason enum
-- (protos/convergence/v1/error_reason.proto): envoy.py puts the table in place
-- of the marker below when it renders Envoy's configuration.
local TITLES = {
  --[[TITLES]]
}
-- A status no ErrorReason has.
local OTHER_CLIENT_ERROR = "--[[TITLE_4XX]]"

-- Seconds a client is asked to wait after a 429 that carries no wait of its own.
local DEFAULT_RETRY_AFTER = 1

-- gRPC code -> HTTP status, as Envoy maps them; used only when the
-- transcoder left a non-error :status behind.
local GRPC_TO_HTTP = {
  [1] = 499, [2] = 500, [3] = 400, [4] = 504, [5] = 404, [6] = 409, [7] = 403,
  [8] = 429, [9] = 400, [10] = 409, [11] = 400, [12] = 501, [13] = 500,
  [14] = 503, [15] = 500, [16] = 401,
}

local function title(status)
  local t = TITLES[status]
  if t ~= nil then return t end
  if status >= 500 then return TITLES[500] end
  return OTHER_CLIENT_ERROR
end

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- True when s is well-formed UTF-8 (so it may go into JSON as is).
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then len = 3
    elseif c >= 0xF0 and c <= 0xF4 then len = 4
    else return false end
    if i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local cc = s:byte(j)
      if cc < 0x80 or cc > 0xBF then return false end
    end
    i = i + len
  end
  return true
end

local ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }

local function json_string(s)
  if not valid_utf8(s) then
    s = s:gsub("[\128-\255]", "?")
  end
  local escaped = s:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

local function set_error_headers(headers, status)
  headers:replace(":status", tostring(status))
  for _, name in ipairs(STRIP) do headers:remove(name) end
end

-- The status a REST error response should carry: x-http-status when it is a
-- valid error status, else the transcoder's, else one mapped from grpc-status.
local function error_status(headers, wanted)
  local status = tonumber(headers:get(":status") or "") or 200
  local from_server = tonumber(wanted or "")
  if from_server ~= nil and from_server >= 400 and from_server <= 599 then
    return from_server
  end
  if status < 400 then
    local grpc_status = tonumber(headers:get("grpc-status") or "") or 2
    return GRPC_TO_HTTP[grpc_status] or 500
  end
  return status
end

local function generic_body(status, grpc_message, request_id)
  local body = '{"error":' .. json_string(title(status))
    .. ',"message":' .. json_string(percent_decode(grpc_message or ""))
  if status == 429 then
    body = body .. ',"retry_after":' .. DEFAULT_RETRY_AFTER
  end
  return body .. ',"request_id":' .. json_string(request_id or "") .. '}'
end

-- At most `limit` (MAX_ECHO) bytes of a JSON-escaped text, then "...": never
-- an escape sequence or a UTF-8 character cut in two.
local MAX_ECHO, MAX_MESSAGE = 64, 512
local function echo(escaped, limit)
  limit = limit or MAX_ECHO
  if #escaped <= limit then return escaped end
  local i = 1
  while i <= #escaped do
    local c = escaped:byte(i)
    local len
    if c == 92 then  -- \n..., \uXXXX, or a surrogate pair \uD8xx\uDCxx kept whole
      len = 2
      if escaped:sub(i + 1, i + 1) == "u" then
        local code = tonumber(escaped:sub(i + 2, i + 5), 16) or 0
        local pair = code >= 0xD800 and code <= 0xDBFF and escaped:sub(i + 6, i + 7) == "\\u"
        len = pair and 12 or 6
      end
    elseif c < 0x80 then len = 1
    elseif c >= 0xF0 then len = 4
    elseif c >= 0xE0 then len = 3
    else len = 2 end
    if i + len - 1 > limit then break end
    i = i + len
  end
  return escaped:sub(1, i - 1) .. "..."
end

-- Envoy's messages that quote the input (JSON-escaped, as they stand in the
-- body), as text, input, text (, input, text). An input is matched greedily:
-- it may hold quotes and backslashes of its own.
local QUOTING = {
  '^(.-invalid value \\")(.*)(\\" for type [^"\\]*)$',
  '^(Could not find field \\")(.*)(\\" in the type \\"[%w_.]*\\"%.)$',
  '^(The binding value \\")(.*)(\\" of the field [%w_.]+ is conflicting with the value \\")'
    .. '(.*)(\\" in the body%.)$',
}

-- The parts of a message that quotes the input (the inputs at even places), or nil.
local function quoted_parts(message)
  for _, shape in ipairs(QUOTING) do
    local parts = { message:match(shape) }
    if #parts > 0 then return parts end
  end
  return nil
end

-- Envoy's text with each input it quotes cut to MAX_ECHO, as the server's own
-- messages are; any other text cut to MAX_MESSAGE.
local function shortened(text)
  local parts = quoted_parts(text)
  if parts == nil then return echo(text, MAX_MESSAGE) end
  for i = 2, #parts, 2 do parts[i] = echo(parts[i]) end
  return table.concat(parts)
end

-- The field and issue of Envoy's message (JSON-escaped, as it stands in the
-- body): "limit: invalid value ..." names limit; a path Envoy cannot normalize is
-- "path"; an unknown query parameter, a
-- body field contradicting the path and a header name this filter refused name
-- theirs; anything else is about the body as a whole (JSON that does not
-- parse, a wrong shape).
local function field_and_issue(message)
  if message == "Malformed request (path_normalization_failed)" then
    return "path", "is not a valid URL path (it holds an encoded NUL, %00)"
  end
  local field, issue = message:match("^([%w_]+[%w_.%[%]]*): (.+)$")
  if field ~= nil then
    -- A map's entry is named by its place ("parameters[0].value"), which the
    -- caller never wrote: the map is named instead.
    local map = field:match("^([%w_]+)%[%d+%]%.value$")
    if map ~= nil and issue:find("for type TYPE_STRING$") then
      issue = "each value must be a JSON string (" .. issue .. ")"
    end
    return map or field, issue
  end
  local parts = quoted_parts(message)
  if parts ~= nil and parts[1] == 'Could not find field \\"' then
    return parts[2], "is not a parameter of this request"
  end
  field, issue = message:match("^Header name '([^\\\"]-)' (is not accepted.*)$")
  if field ~= nil then return field, issue end
  -- A field name here, though the message says "type" (a message type or
  -- TYPE_STRING is not a field: those fall through to "body").
  field = message:match("^: invalid value .- for type ([a-z][a-z0-9_]*)$")
  if field ~= nil then return field, "has the wrong JSON type" end
  field = message:match("^The binding value .- of the field ([%w_.]+) is conflicting")
  if field ~= nil then return field, "must match the path (or be left out of the body)" end
  return "body", message
end

-- Envoy's own 400 body {"details", "error", "message", "request_id"} (the
-- mapper's, keys in order) with "details" naming the field. A HEAD's comes
-- without its body already: the length of the body a GET would get is not
-- known, so none is given (RFC 9110 allows a HEAD's response to leave it out).
local function name_the_field(handle, head)
  local buffer = handle:body(true)
  if buffer == nil then return nil end
  if head and buffer:length() == 0 then
    handle:headers():remove("content-length")
    return buffer
  end
  local body = buffer:getBytes(0, buffer:length())
  local message, rest = body:match('"message":"(.-)"(,"request_id":"[^"]*"}%s*)$')
  if message == nil then return buffer end
  if message == "" then  -- no text of Envoy's own: why it refused (the mapper's details)
    local why = body:match('"issue":"([%w_.-]*)"')
    message = "Malformed request (" .. (why or "unknown") .. ")"
  end
  -- Bytes that are not UTF-8 (echoed from a body that is not) are replaced.
  if not valid_utf8(message) then message = message:gsub("[\128-\255]", "?") end
  -- Each part is JSON-escaped text taken from the message.
  local field, issue = field_and_issue(message)
  message, issue, field = shortened(message), shortened(issue), echo(field)
  local shaped = '{"error":' .. json_string(title(400)) .. ',"message":"' .. message
    .. '","details":{"field":"' .. field .. '","issue":"' .. issue .. '"}' .. rest
  local headers = handle:headers()
  headers:replace("content-length", tostring(#shaped))
  -- A request refused before any filter saw it (a path Envoy cannot normalize) has
  -- its id in the body only: the header says it too, as on every other reply.
  local id = rest:match('"request_id":"([^"]+)"')
  if id ~= nil and headers:get("x-request-id") == nil then headers:add("x-request-id", id) end
  buffer:setBytes(shaped)
  return buffer
end

-- Shapes the response; returns its body's buffer when it read the whole body (an
-- error), nil when the body streams through (a success).
local function shape_response(handle, request_id, head)
  local headers = handle:headers()
  local grpc_status = tonumber(headers:get("grpc-status") or "0") or 2

  local error_body = headers:get("x-error-body")
  if error_body == nil and grpc_status == 0 and headers:get(":status") == "400" then
    return name_the_field(handle, head)
  end
  if error_body == nil and grpc_status == 0 then
    -- Success: no buffering, only strip the grpc-* headers that leak.
    for _, name in ipairs(STRIP) do headers:remove(name) end
    return nil
  end

  local wanted = headers:get("x-http-status")
  local message = headers:get("grpc-message")
  local status = error_status(headers, wanted)
  -- Waits for the end of the response. A trailers-only gRPC error (the usual
  -- case) has no body: body(true) then gives an empty buffer to fill.
  local buffer = handle:body(true)
  -- A header wrapper taken before body() may be dead afterwards (seen when the
  -- response ended with trailers): take a fresh one.
  headers = handle:headers()
  if error_body == nil then
    -- The server sent its headers before failing: the transcoder moved
    -- grpc-status into the headers, x-error-body is in the trailers.
    local trailers = handle:trailers()
    if trailers ~= nil then
      error_body = trailers:get("x-error-body")
      if error_body ~= nil then
        status = error_status(headers, trailers:get("x-http-status"))
      end
      message = message or trailers:get("grpc-message")
      for _, name in ipairs(STRIP) do trailers:remove(name) end
    end
  end
  local body = error_body or generic_body(status, message, request_id)

  set_error_headers(headers, status)
  if error_body == nil and status == 429 and headers:get("retry-after") == nil then
    headers:add("retry-after", tostring(DEFAULT_RETRY_AFTER))
  end
  if buffer == nil then
    -- Headers, then trailers, no data: Envoy's Lua cannot add a body here.
    -- The status is right, the body stays empty.
    headers:remove("content-type")
    headers:replace("content-length", "0")
    return nil
  end
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#body))
  buffer:setBytes(body)
  return buffer
end

-- A HEAD's response without its body: a body read whole is emptied (its length
-- kept); one streaming through is dropped chunk by chunk, never buffered. (Envoy's
-- own replies to a HEAD come without their body already; their length is kept,
-- but for the 400s that name_the_field reshapes.)
local function drop_body(handle, buffer)
  if buffer == nil then
    for chunk in handle:bodyChunks() do chunk:setBytes("") end
  elseif buffer:length() > 0 then
    local length = buffer:length()
    buffer:setBytes("")
    handle:headers():replace("content-length", tostring(length))
  end
end

-- The first header whose name gRPC refuses as a metadata key (HTTP allows
-- more characters, e.g. "+", "!", "~"), or nil. Pseudo-headers are skipped.
local function bad_header_name(headers)
  for name, _ in pairs(headers) do
    if name:sub(1, 1) ~= ":" and name:find("[^0-9a-z_.%-]") then
      return name
    end
  end
  return nil
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local metadata = request_handle:streamInfo():dynamicMetadata()
  local ct = headers:get("content-type")
  if ct ~= nil and ct:lower():sub(1, 16) == "application/grpc" then
    metadata:set(META_NS, "native_grpc", true)
    return
  end
  -- Passed on, such a header would make the server's gRPC library fail the
  -- call (a 500): refuse it here (local_reply_config gives the 400 its body).
  local bad = bad_header_name(headers)
  if bad ~= nil then
    request_handle:respond({[":status"] = "400"}, "Header name '" .. bad:sub(1, 64)
      .. "' is not accepted: use letters, digits, '-' and '.'")
    return
  end
  -- HEAD is GET without the body (RFC 9110): the transcoder knows only GET
  -- routes, so it is passed on as one, and its response's body is dropped. Not
  -- a watch: its response is a stream that lasts as long as the run.
  if headers:get(":method") == "HEAD" then
    local path = (headers:get(":path") or ""):match("^[^?]*")
    if path:sub(-6) == ":watch" then
      request_handle:respond({[":status"] = "405"}, "HEAD is not supported on a watch: use GET")
      return
    end
    headers:replace(":method", "GET")
    metadata:set(META_NS, "head", true)
  end
  -- The id Envoy generated (the response's x-request-id is only added after
  -- this filter has run on the response).
  metadata:set(META_NS, "request_id", headers:get("x-request-id") or "")
end

function envoy_on_response(response_handle)
  local meta = response_handle:streamInfo():dynamicMetadata():get(META_NS)
  if meta ~= nil and meta["native_grpc"] then
    return
  end
  local request_id = meta and meta["request_id"]
  local head = meta ~= nil and meta["head"]
  -- A script error must never leave the response hanging: contain it.
  local ok, err = pcall(function()
    local buffer = shape_response(response_handle, request_id, head)
    if head then drop_body(response_handle, buffer) end
  end)
  if not ok then
    response_handle:logErr("error_body.lua: " .. tostring(err))
  end
end
