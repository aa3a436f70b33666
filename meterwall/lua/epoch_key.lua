-- Get or create the IP-pseudonym key(s) of one hourly epoch.
--
-- KEYS[1]  the epoch hash, e.g. "mw:epk:493012"
-- ARGV[1]  key id (hex) of the candidate key this writer made
-- ARGV[2]  the candidate, wrapped under the key derived from MW_PSEUDONYM_SECRET
-- ARGV[3]  unix time at which the epoch's keys must be gone (epoch end + retention)
--
-- The first writer's candidate wins; everybody gets the hash back and uses its smallest key id,
-- so all writers agree. A key a writer published while Redis was away is simply another field
-- (a search by IP tries them all). The hash expires with the retention window: after that the
-- pseudonyms of that hour can never be linked to an address again.
-- ARGV[5]  the epoch's length in seconds (3600: an hour; 86400: a day's unique-client key)
--
-- A writer whose clock runs ahead asks for a later end: capped at Redis's own now + one epoch +
-- the 24-hour ceiling, as its records are.
if redis.call('HLEN', KEYS[1]) == 0 or ARGV[4] == 'add' then
  redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
  local latest = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[5] or '3600') + 86400
  redis.call('EXPIREAT', KEYS[1], string.format('%d', math.min(tonumber(ARGV[3]), latest)))
end
return redis.call('HGETALL', KEYS[1])
