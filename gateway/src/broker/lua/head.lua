-- Where a room's history ends, read by a node before it subscribes to the room: its epoch and
-- its newest offset ('' when it holds no entry). A room without history gets its epoch now, so
-- that if Redis later loses its data, the epoch a node remembers no longer matches and the
-- loss cannot pass for "nothing was published".
-- KEYS[1] history stream   KEYS[2] epoch
-- ARGV[1] epoch to use if the room has none   ARGV[2] its lifetime (ms), as the history's
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'PX', ARGV[2])
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if newest then return {epoch, newest[1]} end
return {epoch, ''}
