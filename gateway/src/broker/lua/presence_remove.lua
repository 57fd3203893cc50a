-- Takes users of one node offline in a room: those whose connections all closed (ARGV users),
-- and, with node '', every entry whose expiry passed (a node that died). Announces each user
-- who is then online nowhere.
-- KEYS as presence_upsert.lua.
-- ARGV[1] now (ms)  ARGV[2] channel  ARGV[3] publish time (µs)  ARGV[4] room  ARGV[5] node
-- then users
local gone = {}
if ARGV[5] == '' then
  gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
else
  for i = 6, #ARGV do gone[#gone + 1] = ARGV[5] .. '\31' .. ARGV[i] end
end
local left = 0
for _, member in ipairs(gone) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local user = string.match(member, '\31(.*)$')
    if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
      local name = redis.call('HGET', KEYS[3], user)
      redis.call('HDEL', KEYS[2], user)
      redis.call('HDEL', KEYS[3], user)
      local event = {type = 'presence_event', room = ARGV[4], event = 'leave', userId = user}
      if name then event.name = name end
      redis.call('PUBLISH', ARGV[2], ARGV[3] .. '\np\n\n\n' .. cjson.encode(event))
      left = left + 1
    end
  end
end
return left
