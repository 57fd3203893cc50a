-- Appends a chat message to its room's history and publishes it, atomically, so every
-- delivered message has a stream offset and no stored message goes unpublished. A message whose
-- client id (cid) was stored recently is not stored again: the original is returned instead.
-- KEYS[1] history stream   KEYS[2] epoch of that stream
-- KEYS[3] recent cids (current generation)   KEYS[4] recent cids (previous generation)
-- ARGV[1] pub/sub channel  ARGV[2] frame JSON   ARGV[3] max length   ARGV[4] max age (ms)
-- ARGV[5] epoch to use if the history is new   ARGV[6] publish time (µs)
-- ARGV[7] message id   ARGV[8] user \31 cid, or '' for none   ARGV[9] dedup window (ms)
-- Returns {offset, epoch, message id, 1 if a duplicate else 0}.
local cid = ARGV[8]
if cid ~= '' then
  local seen = redis.call('HGET', KEYS[3], cid) or redis.call('HGET', KEYS[4], cid)
  if seen then
    -- "offset epoch id", as stored below.
    local offset, epoch, id = string.match(seen, '^(%S+) (%S+) (%S+)$')
    return {offset, epoch, id, 1}
  end
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  -- No history (first message, expired, or Redis lost its data): a new epoch tells resuming
  -- clients that offsets from before cannot be replayed. An epoch without a stream was given
  -- by a subscribing node (head.lua) and is kept.
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
if cid ~= '' then
  -- Two generations: a cid stays findable for at least one window and at most two. The empty
  -- field holds the current generation's birth time.
  local window = tonumber(ARGV[9])
  local born = tonumber(redis.call('HGET', KEYS[3], '') or '')
  if (not born) or now_ms - born >= window then
    if born then redis.call('RENAME', KEYS[3], KEYS[4]) end
    redis.call('HSET', KEYS[3], '', now_ms)
    redis.call('PEXPIRE', KEYS[3], window * 2)
  end
  redis.call('HSET', KEYS[3], cid, id .. ' ' .. epoch .. ' ' .. ARGV[7])
end
return {id, epoch, ARGV[7], 0}
