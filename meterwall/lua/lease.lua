-- Lease rate and quota tokens for one consumer, atomically (see meterwall/limits.py).
--
-- KEYS[1]  the consumer's GCRA state: its theoretical arrival time, in ms
-- KEYS[2]  the consumer's quota of one billing month: a hash with 'used' (tokens granted and not
--          given back) and one field per outstanding lease, 'l:<id>' = 'granted:reported:deadline'
-- ARGV     now_ms (0: Redis TIME), interval_ms (0: no rate limit), burst, rate_want,
--          rate_return, quota (0: no quota), quota_want, quota_return, lease_id, lease_ttl_ms,
--          keep_s (the quota hash's time to live),
--          share, then (lease id, spent, final) for each lease this worker holds.
-- Returns  {rate_granted, rate_left, retry_ms, quota_granted, quota_left, refused}, where
--          refused is 0, 1 (by the rate) or 2 (by the quota)
--
-- A lease is a reservation: its tokens count as used until the worker settles it. The worker
-- reports what it has spent with every call; a lease it never settles (the worker was killed)
-- is reclaimed here once its deadline has passed, giving back what was not reported spent.
-- Everything is validated before the first write: Redis does not roll a script back.

local n = {}
for i = 1, 12 do
  n[i] = tonumber(ARGV[i])
  if n[i] == nil and i ~= 9 then
    return redis.error_reply('ERR lease: argument ' .. i .. ' is not a number')
  end
end
if (#ARGV - 12) % 3 ~= 0 then
  return redis.error_reply('ERR lease: settlements come in threes')
end
local settle = {}
for i = 13, #ARGV, 3 do
  local spent, final = tonumber(ARGV[i + 1]), ARGV[i + 2]
  if spent == nil or spent < 0 or (final ~= '0' and final ~= '1') then
    return redis.error_reply('ERR lease: bad settlement for ' .. ARGV[i])
  end
  settle[#settle + 1] = {ARGV[i], spent, final == '1'}
end

local now = n[1]
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local interval, burst, rate_want, rate_return = n[2], n[3], n[4], n[5]
local quota, quota_want, quota_return = n[6], n[7], n[8]
local lease_id, ttl, keep_s, share = ARGV[9], n[10], n[11], n[12]

local function share_of(available, want)
  if available < 1 or want < 1 then return 0 end
  return math.min(want, math.max(1, math.floor(available / share)))
end

-- The quota: settle, reclaim, then grant, on one read of the hash (HGETALL); its writes wait
-- until the rate has answered, which may take the new lease back, and go out as one HDEL and
-- one HSET. Every command here counts in Redis's command statistics: fewer is cheaper.
local quota_granted, quota_left, refused = 0, -1, 0
local held, sets, dels, used = {}, {}, {}, 0
if quota > 0 then
  local fields = redis.call('HGETALL', KEYS[2])
  for i = 1, #fields, 2 do held[fields[i]] = fields[i + 1] end
  used = tonumber(held['used'] or '0') - quota_return
  for _, s in ipairs(settle) do
    local field = 'l:' .. s[1]
    local value = held[field]
    if value then
      local granted, reported, deadline = string.match(value, '^(%d+):(%d+):(%d+)$')
      granted, reported = tonumber(granted), tonumber(reported)
      local spent = math.min(granted, math.max(reported, s[2]))
      if s[3] then
        used = used - (granted - spent)
        held[field], sets[field] = nil, nil
        dels[#dels + 1] = field
      else
        held[field] = granted .. ':' .. spent .. ':' .. deadline
        sets[field] = held[field]
      end
    end
  end
  for field, value in pairs(held) do -- a lease past its deadline: its worker is gone
    local granted, reported, deadline = string.match(value, '^(%d+):(%d+):(%d+)$')
    if granted and tonumber(deadline) < now then
      used = used - (tonumber(granted) - tonumber(reported))
      held[field], sets[field] = nil, nil
      dels[#dels + 1] = field
    end
  end
  if used < 0 then used = 0 end
  quota_granted = share_of(quota - used, quota_want)
  used = used + quota_granted
  if quota_granted == 0 and quota_want > 0 then
    refused = 2
    rate_want = 0 -- no rate token is spent on a refused request
  end
end

-- The rate: GCRA, where a token is one emission interval of the theoretical arrival time.
local rate_granted, rate_left, retry_ms = 0, -1, 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  if rate_return > 0 then tat = math.max(now, tat - rate_return * interval) end
  local available = math.floor((now + burst * interval - tat) / interval)
  rate_granted = share_of(available, rate_want)
  tat = tat + rate_granted * interval
  rate_left = math.max(0, available - rate_granted)
  if rate_want > 0 and rate_granted == 0 then refused = 1 end
  if rate_left < 1 then retry_ms = math.max(0, math.ceil(tat + interval - burst * interval - now)) end
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.max(1, math.ceil(tat - now)) + 1000)
  if quota_granted > 0 and rate_want > 0 and rate_granted == 0 then
    used = used - quota_granted -- refused by the rate: the quota lease is not made
    quota_granted = 0
  end
end

if quota > 0 then
  if quota_granted > 0 then sets['l:' .. lease_id] = quota_granted .. ':0:' .. (now + ttl) end
  -- In chunks: unpack has a limit, and a fleet killed at once leaves thousands of leases.
  for i = 1, #dels, 1000 do
    redis.call('HDEL', KEYS[2], unpack(dels, i, math.min(i + 999, #dels)))
  end
  local args = {'used', used}
  for field, value in pairs(sets) do
    if #args >= 1000 then redis.call('HSET', KEYS[2], unpack(args)); args = {} end
    args[#args + 1] = field
    args[#args + 1] = value
  end
  redis.call('HSET', KEYS[2], unpack(args))
  -- keep_s always names the same moment (a week past the month's end), so it is set when the
  -- hash is new ('used' is never deleted, so a hash that was read had it) and when a worker
  -- settles nothing (its first lease): a hash that lost its expiry gets it back, and a worker
  -- holding leases does not pay for it with every lease.
  if held['used'] == nil or #settle == 0 then
    redis.call('EXPIRE', KEYS[2], math.max(1, keep_s))
  end
  quota_left = math.max(0, quota - used)
end

return {rate_granted, rate_left, retry_ms, quota_granted, quota_left, refused}
