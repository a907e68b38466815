"""The Lua script behind `RedisBudgetCounters` (see billing/budget_counters.py).

Holds expire when `now` reaches their deadline; each operation first releases up
to 100 expired holds on every line it touches. `now` is Redis's clock (TIME) unless
the caller passes its own (tests do, to move time).
Numbers are Lua doubles: exact below 2**53, which the Python side enforces.
Rate buckets hold a fractional level; replies carry it in thousandths, because
Redis truncates Lua numbers to integers.
"""

# One script for every operation, so each is one atomic round trip.
# KEYS: [1] the request's settle marker, then per line: settled, reserved,
#       holds (zset request -> deadline), amounts (hash request -> nanos), refused
#       (set when a request was refused), then per rate bucket its hash (level, ts),
#       then (reserve, optional) the in-flight hash of the process serving the request.
# ARGV: op, request id, now (s; empty: Redis's TIME), line count, nanos, hold ttl (s),
#       settle memory (s), bucket count, then per line: limit, hard (1/0), key ttl in
#       ms (0: forever), then per bucket: capacity, refill per second, amount (reserve: to take;
#       settle: to give back, negative to take more), then (reserve, optional) the request's
#       in-flight entry (billing/inflight.py), stored with its holds (lease: the
#       lease's entry; lease_return: the key alone, to delete it); (settle, optional) the
#       id of the lease the request was admitted from.
# The settle marker holds the settled nanos, or 'void' for a request given up on.
# A lease (billing/budget_leases.py) is a hold like a request's, under the lease's id,
# grown by each `lease` call; `settle` with its id moves a request's cost out of it into
# settled, `lease_return` releases what is left and gives back the bucket units.
BUDGET_COUNTERS_LUA = """
local op, rid, now, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if not now then
  -- No caller clock (the proxy's case): Redis's own, the one clock every replica
  -- shares, so a replica whose clock is off cannot expire another's holds early or
  -- see a bucket refilled by its skew.
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local nanos, m = tonumber(ARGV[5]), tonumber(ARGV[8])

local function keys(i)
  local k = 1 + (i - 1) * 5
  return KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
end
local function arg(i, j) return ARGV[8 + (i - 1) * 3 + j] end
local function bucket(j)
  local a = 8 + n * 3 + (j - 1) * 3
  return KEYS[1 + n * 5 + j], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
end

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

-- Take `by` (at most what it holds) off a hold; released whole when nothing is left.
local function shrink(reserved, holds, amounts, id, by)
  local held = tonumber(redis.call('HGET', amounts, id) or 0)
  local take = math.min(held, by)
  if take > 0 and take == held then
    release(reserved, holds, amounts, id)
  elseif take > 0 then
    redis.call('HINCRBY', amounts, id, -take)
    if redis.call('EXISTS', reserved) == 1 and redis.call('DECRBY', reserved, take) < 0 then
      redis.call('SET', reserved, 0, 'KEEPTTL')
    end
  end
  return take
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

-- A bucket's level now: what it held, refilled since, never above capacity.
local function level_of(j)
  local key, capacity, rate = bucket(j)
  local state = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(state[1]), tonumber(state[2])
  if not level then return capacity end
  return math.min(capacity, level + math.max(0, now - ts) * rate)
end

local function store_level(j, level)
  local key, capacity, rate = bucket(j)
  if level >= capacity then redis.call('DEL', key); return end
  redis.call('HSET', key, 'level', tostring(level), 'ts', tostring(now))
  -- Forgotten once full again: a missing bucket reads as full.
  redis.call('PEXPIRE', key, math.ceil((capacity - level) / rate * 1000) + 1000)
end

local function every_line(code)
  local out = {code}
  for i = 1, n do
    local s, r = totals(i)
    table.insert(out, s); table.insert(out, r)
  end
  return out
end

if op == 'reserve' or op == 'lease' then
  -- A lease takes room and units ahead of requests, under the lease's id: its hold
  -- grows (and its deadline moves) with each call, and a refusal is not a request's.
  local leasing = op == 'lease'
  -- Voided: its caller gave up waiting (a slow or frozen Redis); take nothing.
  if not leasing and redis.call('EXISTS', KEYS[1]) == 1 then return {5} end
  local missing = {2}
  for i = 1, n do
    expire(i)
    local settled = keys(i)
    if redis.call('EXISTS', settled) == 0 then table.insert(missing, i) end
  end
  if #missing > 1 then return missing end
  if n > 0 and not leasing then
    local _, _, _, amounts = keys(1)
    if redis.call('HEXISTS', amounts, rid) == 1 then return every_line(3) end
  end
  local exceeded = {1}
  for i = 1, n do
    local s, r = totals(i)
    if arg(i, 2) == '1' and s + r + nanos > tonumber(arg(i, 1)) then
      table.insert(exceeded, i); table.insert(exceeded, s); table.insert(exceeded, r)
      if not leasing then
        local _, _, _, _, refused = keys(i)
        redis.call('SET', refused, now)
        local ttl = tonumber(arg(i, 3))
        if ttl > 0 then redis.call('PEXPIRE', refused, ttl) end
      end
    end
  end
  if #exceeded > 1 then return exceeded end
  local levels, limited = {}, {4}
  for j = 1, m do
    local _, _, _, amount = bucket(j)
    levels[j] = level_of(j)
    if levels[j] < amount then
      table.insert(limited, j); table.insert(limited, math.floor(levels[j] * 1000))
    end
  end
  if #limited > 1 then return limited end
  local deadline = now + tonumber(ARGV[6])
  for i = 1, n do
    local _, reserved, holds, amounts = keys(i)
    redis.call('INCRBY', reserved, ARGV[5])
    redis.call('ZADD', holds, deadline, rid)
    if leasing then
      redis.call('HINCRBY', amounts, rid, ARGV[5])
    else
      redis.call('HSET', amounts, rid, ARGV[5])
    end
    local ttl = tonumber(arg(i, 3))
    if ttl > 0 then
      for _, key in ipairs({reserved, holds, amounts}) do redis.call('PEXPIRE', key, ttl) end
    end
  end
  local entry = ARGV[9 + n * 3 + m * 3]
  if entry then redis.call('HSET', KEYS[2 + n * 5 + m], rid, entry) end
  local out = every_line(0)
  for j = 1, m do
    local _, _, _, amount = bucket(j)
    store_level(j, levels[j] - amount)
    table.insert(out, math.floor((levels[j] - amount) * 1000))
  end
  return out
elseif op == 'settle' then
  -- With a lease id (the trailing ARGV): a request admitted from that lease, whose cost
  -- moves out of the lease's hold into settled (settled + reserved stays as it was).
  if not redis.call('SET', KEYS[1], ARGV[5], 'NX', 'EX', ARGV[7]) then return {3} end
  local lease = ARGV[9 + n * 3 + m * 3]
  local out = {0, 0}
  for i = 1, n do
    expire(i)
    local settled, reserved, holds, amounts = keys(i)
    local freed
    if lease then
      freed = shrink(reserved, holds, amounts, lease, nanos)
    else
      freed = release(reserved, holds, amounts, rid)
    end
    out[2] = math.max(out[2], freed)
    if redis.call('EXISTS', settled) == 1 then
      redis.call('INCRBY', settled, ARGV[5])
    else
      table.insert(out, i)
    end
  end
  for j = 1, m do
    local _, capacity, _, amount = bucket(j)
    if amount ~= 0 then store_level(j, math.min(capacity, level_of(j) + amount)) end
  end
  return out
elseif op == 'lease_return' then
  -- A lease given back: its hold released (nanos >= 0: only that much of it, the room
  -- it has not handed out), its unused units back in their buckets (negative: units its
  -- requests used beyond their estimates, taken now), and its in-flight entry (optional
  -- KEYS, as for reserve) deleted when it is released whole.
  local out = {0, 0}
  for i = 1, n do
    local _, reserved, holds, amounts = keys(i)
    local freed
    if nanos < 0 then
      freed = release(reserved, holds, amounts, rid)
    else
      freed = shrink(reserved, holds, amounts, rid, nanos)
    end
    out[2] = math.max(out[2], freed)
  end
  for j = 1, m do
    local _, capacity, _, amount = bucket(j)
    if amount ~= 0 then store_level(j, math.min(capacity, level_of(j) + amount)) end
  end
  local inflight = KEYS[2 + n * 5 + m]
  if inflight and nanos < 0 then redis.call('HDEL', inflight, rid) end
  return out
elseif op == 'void' then
  -- The caller gave up on its reserve, which may not have run yet: mark the request
  -- settled (a reserve arriving later takes nothing) and release what it holds.
  redis.call('SET', KEYS[1], 'void', 'EX', ARGV[7])
  local held = false
  for i = 1, n do
    local _, reserved, holds, amounts = keys(i)
    if redis.call('HEXISTS', amounts, rid) == 1 then held = true end
    release(reserved, holds, amounts, rid)
  end
  -- Its rate charges are given back only if its holds show it ran (a request with no
  -- budget line leaves its tokens taken: they refill within the bucket's window).
  if held then
    for j = 1, m do
      local _, capacity, _, amount = bucket(j)
      if amount ~= 0 then store_level(j, math.min(capacity, level_of(j) + amount)) end
    end
  end
  return {0}
elseif op == 'abandon' then
  -- Its process died (billing/inflight.py): a settled request answers {1, the nanos it
  -- settled}; any other is voided (if not already), its holds released, and answers {0}.
  if not redis.call('SET', KEYS[1], 'void', 'NX', 'EX', ARGV[7]) then
    local settled = tonumber(redis.call('GET', KEYS[1]))
    if settled then return {1, settled} end
  end
  for i = 1, n do
    local _, reserved, holds, amounts = keys(i)
    release(reserved, holds, amounts, rid)
  end
  return {0}
elseif op == 'spent' then
  local out = {0}
  for i = 1, n do
    expire(i)
    local s, r = totals(i)
    local _, _, _, _, refused = keys(i)
    table.insert(out, s); table.insert(out, r); table.insert(out, redis.call('EXISTS', refused))
  end
  return out
elseif op == 'levels' then
  local out = {0}
  for j = 1, m do table.insert(out, math.floor(level_of(j) * 1000)) end
  return out
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
