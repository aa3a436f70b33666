-- Apply one writer's packed batch to one logical shard, exactly once.
--
-- KEYS[1]  the shard prefix, e.g. "mw:{s03}:" (every key below starts with it, so they share
--          its hash slot on Redis Cluster)
-- ARGV[1]  msgpack (bytes packed as raw strings: cmsgpack has no bin type):
--          {version = 4, writer, seq, retention_s, counters, records, data_keys, stats,
--           uniques, lateness_s, trim, aggregate_retention}
--   counters  {{kind, bucket, field, delta, expire_at}, ...}: kind 1 = 15 minutes and 2 = hour
--             (bucket = start time; hash of the shard), 3 = day and 4 = month in the consumer's
--             billing zone (bucket = "consumer:YYYY-MM-DD" or "consumer:YYYY-MM")
--   uniques   {{"consumer:YYYY-MM-DD", elements (n x 8 bytes), expire_at}, ...}: HyperLogLogs
--   records   {{slice_start, count, blobs, index}, ...}: one group per time slice, where blobs
--             is the group's sealed records, each prefixed by its 4-byte big-endian length, and
--             index is {ident, positions, ident, positions, ...}: ident = tag + 16-byte
--             identifier, positions = 2 bytes (big-endian) per record of the group it names.
--             Each pair becomes one index member: ident + entry id length (1) + entry id +
--             positions, so a repeated address or consumer costs bytes, not members.
--   data_keys {{key_id_hex, wrapped_key, expire_at}, ...}
--   stats     {{field, delta}, ...}
--   trim      1: remove the slices past the ceiling now; 0: not this time (a writer asks every
--             few seconds per shard, not with every batch); absent (older writers): 1
--   aggregate_retention  {15 minutes, hour, day, month} retention in seconds (unique clients
--             follow days): an expiry further away than that is cut back (a lowered setting,
--             a writer whose clock ran ahead); absent (older writers): never cut back
--
-- Redis does not roll a script back, so the whole input is validated before the first write.
-- The batch is applied only if seq is above the writer's high-water mark for this shard: a
-- retried or replayed batch is a no-op and answers "duplicate" (which the writer counts as
-- success: its earlier attempt landed).
local p = KEYS[1]
local ok, b = pcall(cmsgpack.unpack, ARGV[1])
if not ok or type(b) ~= 'table' then return redis.error_reply('ERR meterwall: batch is not msgpack') end
local function bad(what) return redis.error_reply('ERR meterwall: bad batch: ' .. what) end
if b[1] ~= 4 then return bad('version') end
local writer, seq, retention = b[2], b[3], b[4]
if type(writer) ~= 'string' or not string.match(writer, '^[%w-]+$') then return bad('writer') end
for _, n in ipairs({seq, retention}) do
  if type(n) ~= 'number' or n < 1 then return bad('header numbers') end
end
-- The 24-hour ceiling is enforced here whatever a writer sends, and time is Redis's own: a
-- writer whose clock runs fast must not keep records longer, nor trim other writers' slices.
if retention > 86400 then return bad('retention above the 24-hour ceiling') end
local now = tonumber(redis.call('TIME')[1])
local counters, records, dkeys, stats, uniques = b[5], b[6], b[7], b[8], b[9]
local lateness, trim, ceiling = b[10], b[11], b[12]
if type(lateness) ~= 'number' or lateness < 1 then return bad('lateness') end
if trim ~= nil and trim ~= 0 and trim ~= 1 then return bad('trim') end
if ceiling ~= nil then
  if type(ceiling) ~= 'table' then return bad('aggregate retention') end
  for kind = 1, 4 do  -- (not ipairs: it would stop at a hole)
    if type(ceiling[kind]) ~= 'number' or ceiling[kind] < 1 then
      return bad('aggregate retention')
    end
  end
end
for _, t in ipairs({counters, records, dkeys, stats, uniques}) do
  if type(t) ~= 'table' then return bad('sections') end
end
local kinds = {'c15:', 'c1h:', 'cd:', 'cm:'}
for _, c in ipairs(counters) do
  local numeric = c[1] == 1 or c[1] == 2
  if not kinds[c[1]] or type(c[3]) ~= 'string' or type(c[4]) ~= 'number'
     or type(c[5]) ~= 'number' or (numeric and type(c[2]) ~= 'number')
     or (not numeric and type(c[2]) ~= 'string') then return bad('counter') end
end
for _, u in ipairs(uniques) do
  if type(u[1]) ~= 'string' or type(u[2]) ~= 'string' or #u[2] % 8 ~= 0
     or type(u[3]) ~= 'number' then return bad('uniques') end
end
for _, r in ipairs(records) do
  if type(r[1]) ~= 'number' or type(r[2]) ~= 'number' or r[2] < 1 or type(r[3]) ~= 'string'
     or type(r[4]) ~= 'table' or #r[4] % 2 ~= 0 then return bad('record group') end
  for i = 1, #r[4], 2 do
    local ident, positions = r[4][i], r[4][i + 1]
    if type(ident) ~= 'string' or #ident ~= 17 or type(positions) ~= 'string'
       or #positions == 0 or #positions % 2 ~= 0 then return bad('record index') end
  end
end
for _, k in ipairs(dkeys) do
  if type(k[1]) ~= 'string' or not string.match(k[1], '^%x+$') or type(k[2]) ~= 'string'
     or type(k[3]) ~= 'number' then return bad('data key') end
end
for _, s in ipairs(stats) do
  if type(s[1]) ~= 'string' or type(s[2]) ~= 'number' then return bad('stats') end
end

-- One command in the usual case: SET ... GET answers the old mark, which a duplicate (rare:
-- a retry or a replay) puts back. The mark lives 30 days after the writer's last batch
-- (journal.MARK_LIFETIME_S): a journal adopted later than that is not replayed on its own.
local hwm_key = p .. 'hwm:' .. writer
local old_hwm = redis.call('SET', hwm_key, string.format('%d', seq), 'EX', 2592000, 'GET')
local hwm = tonumber(old_hwm or '0')
if seq <= hwm then
  redis.call('SET', hwm_key, old_hwm, 'EX', 2592000)
  return {'duplicate', tostring(hwm)}
end

-- A closed month is never changed silently: its month deltas become adjustments, its day
-- deltas are left out (the day series stays equal to the closed snapshot). Deltas for a
-- 15-minute bucket older than the lateness bound are applied and counted as late.
local expiring, closed = {}, {}  -- key -> {latest expiry of the batch, kind}
local function expire_with(key, at, kind)
  local known = expiring[key]
  if known == nil then expiring[key] = {at, kind} elseif at > known[1] then known[1] = at end
end
local function is_closed(month_bucket)
  if closed[month_bucket] == nil then
    closed[month_bucket] = redis.call('EXISTS', p .. 'closed:' .. month_bucket) == 1
  end
  return closed[month_bucket]
end
local late = 0
for _, c in ipairs(counters) do
  local bucket = type(c[2]) == 'number' and string.format('%d', c[2]) or c[2]
  local key = p .. kinds[c[1]] .. bucket
  local delta = string.format('%d', c[4])
  if c[1] == 4 and is_closed(bucket) then
    redis.call('HINCRBY', p .. 'adj:' .. bucket, c[3], delta)
    expire_with(p .. 'adj:' .. bucket, c[5], 4)
  elseif not (c[1] == 3 and is_closed(string.sub(bucket, 1, #bucket - 3))) then
    redis.call('HINCRBY', key, c[3], delta)
    expire_with(key, c[5], c[1])
  end
  if c[1] == 1 and now - c[2] > lateness and string.sub(c[3], -9) == '\031requests' then
    late = late + c[4]
  end
end
if late > 0 then redis.call('HINCRBY', p .. 'stats', 'late_requests', late) end
for _, u in ipairs(uniques) do
  local key = p .. 'uq:' .. u[1]
  local args = {}
  for i = 1, #u[2], 8 do
    args[#args + 1] = string.sub(u[2], i, i + 7)
    if #args >= 1000 then redis.call('PFADD', key, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('PFADD', key, unpack(args)) end
  expire_with(key, u[3], 3)  -- unique clients follow the days
end
-- An expiry only moves later: a batch of older requests (a backlog, another writer's late
-- flush) must not cut short what a newer batch set. It is cut back only when it lies further
-- away than the retention itself (a lowered setting; a writer whose clock ran ahead), and then
-- to the retention from now: not to this batch's, which may be older than the key's latest
-- request. TTL, not EXPIRETIME: Redis 6.2 too; -1 (a new key, or one whose expiry was lost)
-- takes the batch's. TTL rounds to the nearest second and `now` is rounded down, so an equal
-- expiry reads as up to a second early: the + 1 keeps it from being set again.
for key, e in pairs(expiring) do
  local at, ttl = e[1], redis.call('TTL', key)
  local longest = ceiling and ceiling[e[2]]
  if longest and ttl > longest + 900 then
    redis.call('EXPIREAT', key, string.format('%d', now + longest))
  elseif ttl < 0 or now + ttl + 1 < at then
    redis.call('EXPIREAT', key, string.format('%d', at))
  end
end

for _, k in ipairs(dkeys) do
  local at = math.min(k[3], now + retention + 3600)  -- a data key never outlives its records
  redis.call('SET', p .. 'dk:' .. k[1], k[2], 'NX', 'EXAT', string.format('%d', at))
end

-- One stream entry per slice group (never one per record) and variadic ZADDs: the work
-- inside Redis grows with the number of index entries, not with redis.call overhead. The
-- stream and the index get their expiry with every write: a key that lost it (restored without
-- TTLs, persisted by hand) gets it back, and a stream created by a writer whose clock runs ahead
-- (its expiry capped at Redis's now + retention) gets the slice's own once Redis's clock is
-- there, as its index does. Such a stream's expiry never moves later, though: each write would
-- otherwise push it to that write's now + retention, keeping its first records past 24 hours.
-- The slice list gets its expiry whenever it gains a slice.
local function expire_slice_key(key, slice_start, at)
  if slice_start > now then
    local ttl = redis.call('TTL', key)
    if ttl >= 0 and now + ttl <= tonumber(at) then return end
  end
  redis.call('EXPIREAT', key, at)
end

local stored, expired, new_slices = 0, 0, 0
for _, r in ipairs(records) do
  local expire_at = math.min(r[1] + retention, now + retention)
  if expire_at <= now then
    expired = expired + r[2]  -- too old to keep: the 24-hour promise wins over completeness
  else
    local slice = string.format('%d', r[1])
    local at = string.format('%d', expire_at)
    local rec = p .. 'rec:' .. slice
    local id = redis.call('XADD', rec, '*', 'n', r[2], 'r', r[3])
    expire_slice_key(rec, r[1], at)
    if #r[4] > 0 then
      local ix = p .. 'ix:' .. slice
      local named = string.char(#id) .. id
      local args = {}
      for i = 1, #r[4], 2 do
        args[#args + 1] = '0'
        args[#args + 1] = r[4][i] .. named .. r[4][i + 1]
        if #args >= 1000 then redis.call('ZADD', ix, unpack(args)); args = {} end
      end
      if #args > 0 then redis.call('ZADD', ix, unpack(args)) end
      expire_slice_key(ix, r[1], at)
    end
    new_slices = new_slices + redis.call('ZADD', p .. 'slices', r[1], slice)
    stored = stored + r[2]
  end
end
if expired > 0 then redis.call('HINCRBY', p .. 'stats', 'records_expired_before_store', expired) end
for _, s in ipairs(stats) do
  redis.call('HINCRBY', p .. 'stats', s[1], string.format('%d', s[2]))
end

if new_slices > 0 then redis.call('EXPIRE', p .. 'slices', retention) end

-- Trim: whatever an expiry missed is removed here, so nothing outlives the ceiling.
if trim ~= 0 then
  local edge = string.format('%d', now - retention)
  local old = redis.call('ZRANGEBYSCORE', p .. 'slices', '-inf', edge)
  for _, slice in ipairs(old) do
    redis.call('DEL', p .. 'rec:' .. slice, p .. 'ix:' .. slice)
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', p .. 'slices', '-inf', edge) end
end
return {'applied', stored, expired}
