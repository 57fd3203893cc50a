#!lua flags=no-writes
-- Reads a room's history in one atomic step: its epoch, the first offset still kept and whether
-- anything was ever trimmed (so a resume can tell whether anything it missed is gone), the last
-- offset, and the entries asked for.
-- KEYS[1] history stream   KEYS[2] epoch
-- ARGV[1] 'since' or 'last'   ARGV[2] the offset (exclusive) or the count
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  return {'', '', '0-0', 0, {}}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- An epoch given when a node subscribed, before any message.
  return {epoch, '', '0-0', 0, {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local first, last, length, added = '', '0-0', 0, 0
for i = 1, #info, 2 do
  local field, value = info[i], info[i + 1]
  if field == 'first-entry' and value then first = value[1] end
  if field == 'last-generated-id' then last = value end
  if field == 'length' then length = value end
  if field == 'entries-added' then added = value end
end
local trimmed = 0
if added > length then trimmed = 1 end
local entries
if ARGV[1] == 'since' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+')
else
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
end
return {epoch, first, last, trimmed, entries}
