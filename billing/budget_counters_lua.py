"""The Lua script behind `RedisBudgetCounters` (see billing/budget_counters.py).

Holds expire when `now` (the caller's clock) reaches their deadline; each
operation first releases up to 100 expired holds on every line it touches.
Numbers are Lua doubles: exact below 2**53, which the Python side enforces.
"""

# One script for every operation, so each is one atomic round trip.
# KEYS: [1] the request's settle marker, then per line: settled, reserved,
#       holds (zset request -> deadline), amounts (hash request -> nanos).
# ARGV: op, request id, now (s), line count, nanos, hold ttl (s), settle memory (s),
#       then per line: limit, hard (1/0), key ttl in ms (0: forever).
BUDGET_COUNTERS_LUA = """
local op, rid, now, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nanos = tonumber(ARGV[5])

local function keys(i)
  local k = 1 + (i - 1) * 4
  return KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
end
local function arg(i, j) return ARGV[7 + (i - 1) * 3 + j] end

local function release(reserved, holds, amounts, id)
  local amount = redis.call('HGET', amounts, id)
  if amount then
    redis.call('HDEL', amounts, id)
    if redis.call('EXISTS', reserved) == 1 and redis.call('DECRBY', reserved, amount) < 0 then
      redis.call('SET', reserved, 0, 'KEEPTTL')
    end
  end
  redis.call('ZREM', holds, id)
  return tonumber(amount or 0)
end

local function expire(i)
  local _, reserved, holds, amounts = keys(i)
  -- At most 100 expired holds per line and call: keeps every call short.
  local ids = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(ids) do release(reserved, holds, amounts, id) end
end

local function totals(i)
  local settled, reserved = keys(i)
  local s = redis.call('GET', settled)
  return s and tonumber(s) or -1, tonumber(redis.call('GET', reserved) or 0)
end

local function every_line()
  local out = {0}
  for i = 1, n do
    local s, r = totals(i)
    table.insert(out, s); table.insert(out, r)
  end
  return out
end

if op == 'reserve' then
  local missing = {2}
  for i = 1, n do
    expire(i)
    local settled = keys(i)
    if redis.call('EXISTS', settled) == 0 then table.insert(missing, i) end
  end
  if #missing > 1 then return missing end
  local _, _, _, amounts = keys(1)
  if redis.call('HEXISTS', amounts, rid) == 1 then
    local out = every_line(); out[1] = 3; return out
  end
  local exceeded = {1}
  for i = 1, n do
    local s, r = totals(i)
    if arg(i, 2) == '1' and s + r + nanos > tonumber(arg(i, 1)) then
      table.insert(exceeded, i); table.insert(exceeded, s); table.insert(exceeded, r)
    end
  end
  if #exceeded > 1 then return exceeded end
  local deadline = now + tonumber(ARGV[6])
  for i = 1, n do
    local _, reserved, holds, amounts = keys(i)
    redis.call('INCRBY', reserved, ARGV[5])
    redis.call('ZADD', holds, deadline, rid)
    redis.call('HSET', amounts, rid, ARGV[5])
    local ttl = tonumber(arg(i, 3))
    if ttl > 0 then
      for _, key in ipairs({reserved, holds, amounts}) do redis.call('PEXPIRE', key, ttl) end
    end
  end
  return every_line()
elseif op == 'settle' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[7]) then return {3} end
  local out = {0, 0}
  for i = 1, n do
    expire(i)
    local settled, reserved, holds, amounts = keys(i)
    out[2] = math.max(out[2], release(reserved, holds, amounts, rid))
    if redis.call('EXISTS', settled) == 1 then
      redis.call('INCRBY', settled, ARGV[5])
    else
      table.insert(out, i)
    end
  end
  return out
elseif op == 'spent' then
  for i = 1, n do expire(i) end
  return every_line()
elseif op == 'seed' then
  local settled = keys(1)
  local current = redis.call('GET', settled)
  if current and tonumber(current) >= nanos then return tonumber(current) end
  local ttl = tonumber(arg(1, 3))
  if ttl > 0 then
    redis.call('SET', settled, ARGV[5], 'PX', ttl)
  else
    redis.call('SET', settled, ARGV[5])
  end
  return nanos
end
return redis.error_reply('unknown budget counter operation ' .. tostring(op))
"""
