-- Erase records from one stored group: rewrite the stream entry without them, and the slice's
-- index without their members (the other records' members are renumbered to the new entry).
--
-- KEYS[1]  the slice's record stream, KEYS[2] the slice's index (same shard tag)
-- ARGV[1]  the stream entry id; ARGV[2..] the positions (0-based) of the records to erase
-- Returns  {records erased, index members removed}
--
-- A group is a concatenation of sealed records, each prefixed by its 4-byte big-endian length;
-- an index member is tag (1) + identifier (16) + entry id length (1) + entry id + the positions
-- (2 bytes each, big-endian) of the entry's records it names. Everything is read and checked
-- before the first write: Redis does not roll a script back.

local entry = ARGV[1]
local drop = {}
for i = 2, #ARGV do
  local position = tonumber(ARGV[i])
  if position == nil then return redis.error_reply('ERR erase: bad position') end
  drop[position] = true
end

local rows = redis.call('XRANGE', KEYS[1], entry, entry)
if #rows == 0 then return {0, 0} end
local fields = rows[1][2]
local group
for i = 1, #fields, 2 do
  if fields[i] == 'r' then group = fields[i + 1] end
end
if group == nil then return redis.error_reply('ERR erase: entry without records') end

local kept, renumber, position, offset, erased = {}, {}, 0, 1, 0
while offset <= #group do
  if offset + 3 > #group then return redis.error_reply('ERR erase: truncated group') end
  local a, b, c, d = string.byte(group, offset, offset + 3)
  local length = ((a * 256 + b) * 256 + c) * 256 + d
  local stop = offset + 4 + length - 1
  if stop > #group then return redis.error_reply('ERR erase: truncated group') end
  if drop[position] then
    erased = erased + 1
  else
    renumber[position] = #kept
    kept[#kept + 1] = string.sub(group, offset, stop)
  end
  position = position + 1
  offset = stop + 1
end

local new_entry = nil
if #kept > 0 then
  new_entry = redis.call('XADD', KEYS[1], '*', 'n', #kept, 'r', table.concat(kept))
end
redis.call('XDEL', KEYS[1], entry)

-- Removed counts index entries (one per identifier and record), not members. A renumbered
-- member is added before the old one goes: removing an index's last member deletes the key,
-- and adding to it then would make a new one without the slice's expiry.
local removed = 0
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
local named = string.char(#entry) .. entry
for _, member in ipairs(members) do
  if #member > 18 and string.sub(member, 18, 18 + #entry) == named then
    local moved = {}
    for i = 19 + #entry, #member - 1, 2 do
      local hi, lo = string.byte(member, i, i + 1)
      local kept_at = renumber[hi * 256 + lo]
      if kept_at ~= nil then
        moved[#moved + 1] = string.char(math.floor(kept_at / 256), kept_at % 256)
      else
        removed = removed + 1
      end
    end
    if #moved > 0 then
      redis.call('ZADD', KEYS[2], 0,
                 string.sub(member, 1, 17) .. string.char(#new_entry) .. new_entry .. table.concat(moved))
    end
    redis.call('ZREM', KEYS[2], member)
  end
end
return {erased, removed}
