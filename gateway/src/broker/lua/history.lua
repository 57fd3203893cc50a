-- Reads a room's history in one atomic step: its epoch, the highest offset trimmed away (so a
-- resume can tell whether anything it missed is gone), the last offset, and the entries asked for.
-- KEYS[1] history stream   KEYS[2] epoch
-- ARGV[1] 'since' or 'last'   ARGV[2] the offset (exclusive) or the count
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  return {'', '0-0', '0-0', {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local max_deleted, last = '0-0', '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then max_deleted = info[i + 1] end
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local entries
if ARGV[1] == 'since' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+')
else
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
end
return {epoch, max_deleted, last, entries}
