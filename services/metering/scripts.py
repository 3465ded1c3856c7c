"""The Lua scripts that make quotas exact: each runs atomically in Redis, so concurrent reserves and commits from any
number of replicas see one consistent state. Time comes from the caller (ARGV), so tests can inject a clock.

KEYS (TenantKeys.script_keys()): 1 config, 2 inflight, 3 reservations, 4 window, 5 window_tokens, 6 state, 7 done,
8 done_at, 9 ledger. Money is in integer n$, tokens are integers; Redis turns Lua numbers into arguments with %.17g,
exact for integers below 1e17.

Invariants kept by every script:
- inflight and reservations hold the same request ids; a reservation's tokens sit in the window (until they slide
  out) and its n$ in `<month>:held` of the month it was made, until it is committed or expires.
- state.win_tokens == sum(window_tokens) over ids in the window.
- An expired reservation is refunded (held n$ and window tokens back to 0) the first time any script of the tenant
  runs after its expiry: expiry is lazy, and the sweeper only makes it prompt.
"""

from __future__ import annotations

_PRELUDE = r"""
-- HINCRBY by -n. Lua 5.1 writes -0 as "-0", which HINCRBY refuses ("value is not an integer"): a window whose
-- sliding entries were all 0-token rejections failed every commit that slid it, and those requests went unbilled.
local function hdecr(key, field, n)
  n = tonumber(n) or 0
  if n ~= 0 then redis.call('HINCRBY', key, field, -n) end
end

local function each_chunk(list, fn)  -- unpack() of thousands of values overflows Lua's C stack
  for i = 1, #list, 500 do
    local chunk = {}
    for j = i, math.min(i + 499, #list) do chunk[#chunk + 1] = list[j] end
    fn(chunk)
  end
end

local function expire_reservations(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, rid in ipairs(gone) do
    local r = redis.call('HGET', KEYS[3], rid)
    if r then
      local _, nano, month = string.match(r, '^(%d+) (%d+) (%S+)$')
      hdecr(KEYS[6], month .. ':held', nano)
      local wt = redis.call('HGET', KEYS[5], rid)
      if wt then
        hdecr(KEYS[6], 'win_tokens', wt)
        redis.call('HSET', KEYS[5], rid, 0)
      end
      redis.call('HDEL', KEYS[3], rid)
    end
  end
  each_chunk(gone, function(c) redis.call('ZREM', KEYS[2], unpack(c)) end)
  return #gone
end

local function slide_window(now, window)
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - window)
  if #old == 0 then return end
  local freed = 0
  each_chunk(old, function(c)
    for _, t in ipairs(redis.call('HMGET', KEYS[5], unpack(c))) do
      if t then freed = freed + tonumber(t) end
    end
    redis.call('HDEL', KEYS[5], unpack(c))
    redis.call('ZREM', KEYS[4], unpack(c))
  end)
  hdecr(KEYS[6], 'win_tokens', freed)
end

-- ms until enough of the window's oldest admissions slide out to free `need` tokens
local function tokens_retry(now, window, need)
  local freed, start = 0, 0
  while true do
    local page = redis.call('ZRANGE', KEYS[4], start, start + 199, 'WITHSCORES')
    if #page == 0 then return window end
    for i = 1, #page, 2 do
      freed = freed + (tonumber(redis.call('HGET', KEYS[5], page[i])) or 0)
      if freed >= need then return tonumber(page[i + 1]) + window - now end
    end
    start = start + 200
  end
end
"""

# ARGV: 1 request id, 2 now ms, 3 estimated tokens, 4 estimated n$, 5 ttl ms, 6 month, 7 window ms,
#       8 ms until next month, 9 retry ms when only in-flight work blocks.
# Returns {status, retry_ms_or_expires_ms, limit}: status 'ok' (2nd: ms until expiry), 'committed', 'unknown_tenant',
# 'concurrency' | 'rpm' | 'tpm' | 'budget' (2nd: retry-after ms), 'tpm_never' | 'budget_never' (cannot ever fit).
RESERVE = _PRELUDE + r"""
local rid, now, est, nano = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, month, window = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_tenant', 0, 0} end
if redis.call('HEXISTS', KEYS[7], rid) == 1 then return {'committed', 0, 0} end
expire_reservations(now)
local expiry = redis.call('ZSCORE', KEYS[2], rid)
if expiry then return {'ok', tonumber(expiry) - now, 0} end
slide_window(now, window)
local lim = redis.call('HMGET', KEYS[1], 'rpm', 'tpm', 'concurrency', 'budget_nano')
local rpm, tpm = tonumber(lim[1]) or 0, tonumber(lim[2]) or 0
local conc, budget = tonumber(lim[3]) or 0, tonumber(lim[4]) or 0
-- a request that can never fit is told so whatever the current load
if tpm > 0 and est > tpm then return {'tpm_never', 0, tpm} end
if budget > 0 and nano > budget then return {'budget_never', 0, budget} end
if conc > 0 and redis.call('ZCARD', KEYS[2]) >= conc then return {'concurrency', tonumber(ARGV[9]), conc} end
if rpm > 0 and redis.call('ZCARD', KEYS[4]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  return {'rpm', tonumber(oldest[2]) + window - now, rpm}
end
if tpm > 0 then
  local used = tonumber(redis.call('HGET', KEYS[6], 'win_tokens')) or 0
  if used + est > tpm then return {'tpm', tokens_retry(now, window, used + est - tpm), tpm} end
end
if budget > 0 then
  local spent = tonumber(redis.call('HGET', KEYS[6], month .. ':spent')) or 0
  local held = tonumber(redis.call('HGET', KEYS[6], month .. ':held')) or 0
  if spent + held + nano > budget then
    -- spent money only comes back next month; held money comes back when in-flight requests commit
    if spent + nano > budget then return {'budget', tonumber(ARGV[8]), budget} end
    return {'budget', tonumber(ARGV[9]), budget}
  end
end
redis.call('ZADD', KEYS[2], now + ttl, rid)
redis.call('HSET', KEYS[3], rid, ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. month)
redis.call('ZADD', KEYS[4], now, rid)
redis.call('HSET', KEYS[5], rid, ARGV[3])
redis.call('HINCRBY', KEYS[6], 'win_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[6], month .. ':held', ARGV[4])
return {'ok', ttl, 0}
"""

# ARGV: 1 request id, 2 now ms, 3 actual tokens, 4 price n$, 5 cost p$, 6 month of now, 7 forget ids committed
#       before this ms, 8 window ms, 9.. ledger field/value pairs.
# Returns {'ok', ledger id}, {'duplicate', "<price> <cost> <ledger id>"} or {'unknown_tenant', ''}.
COMMIT = _PRELUDE + r"""
local rid, now = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_tenant', ''} end
local first = redis.call('HGET', KEYS[7], rid)
if first then return {'duplicate', first} end
expire_reservations(now)
slide_window(now, tonumber(ARGV[8]))
local r = redis.call('HGET', KEYS[3], rid)
if r then
  local _, nano, month = string.match(r, '^(%d+) (%d+) (%S+)$')
  hdecr(KEYS[6], month .. ':held', nano)
  redis.call('HDEL', KEYS[3], rid)
  redis.call('ZREM', KEYS[2], rid)
end
local counted = redis.call('HGET', KEYS[5], rid)
if counted then  -- still in the window: replace the estimate by the actual tokens (the refund)
  redis.call('HSET', KEYS[5], rid, ARGV[3])
  redis.call('HINCRBY', KEYS[6], 'win_tokens', tonumber(ARGV[3]) - tonumber(counted))
end
redis.call('HINCRBY', KEYS[6], ARGV[6] .. ':spent', ARGV[4])
-- ledger ids strictly increase; the caller's clock gives the ms unless it went backwards
local id = ARGV[2] .. '-0'
local last = redis.call('XREVRANGE', KEYS[9], '+', '-', 'COUNT', 1)
if #last > 0 then
  local lms, lseq = string.match(last[1][1], '^(%d+)-(%d+)$')
  if tonumber(lms) >= now then id = lms .. '-' .. (tonumber(lseq) + 1) end
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[9], id, unpack(fields))
redis.call('HSET', KEYS[7], rid, ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. id)
redis.call('ZADD', KEYS[8], now, rid)
local old = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', '(' .. ARGV[7], 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('HDEL', KEYS[7], unpack(old))
  redis.call('ZREM', KEYS[8], unpack(old))
end
return {'ok', id}
"""

# ARGV: 1 now ms, 2 window ms. Refunds expired reservations; returns how many expired.
EXPIRE = _PRELUDE + r"""
local n = expire_reservations(tonumber(ARGV[1]))
slide_window(tonumber(ARGV[1]), tonumber(ARGV[2]))
return n
"""
