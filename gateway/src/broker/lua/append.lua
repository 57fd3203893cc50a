-- Appends a chat message to its room's history and publishes it, atomically, so every
-- delivered message has a stream offset and no stored message goes unpublished.
-- KEYS[1] history stream   KEYS[2] epoch of that stream
-- ARGV[1] pub/sub channel  ARGV[2] frame JSON   ARGV[3] max length   ARGV[4] max age (ms)
-- ARGV[5] epoch to use if the history is new   ARGV[6] publish time (µs)
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  -- No history (first message, expired, or Redis lost its data): a new epoch tells resuming
  -- clients that offsets from before cannot be replayed.
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'f', ARGV[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XTRIM', KEYS[1], 'MINID', '~', tostring(now_ms - tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], ARGV[6] .. '\nm\n' .. id .. '\n' .. epoch .. '\n' .. ARGV[2])
return {id, epoch}
