-- Marks users online in a room on one node until an expiry time, and announces users who were
-- not online anywhere yet. Used on join and, to keep entries alive, on every heartbeat.
-- KEYS[1] zset of node\31user -> expiry (ms)   KEYS[2] hash user -> entries   KEYS[3] hash user -> name
-- ARGV[1] expiry (ms)  ARGV[2] key lifetime (ms)  ARGV[3] channel  ARGV[4] publish time (µs)
-- ARGV[5] room  ARGV[6] node  then pairs: user, name ('' for none)
for i = 7, #ARGV, 2 do
  local user, name = ARGV[i], ARGV[i + 1]
  if redis.call('ZADD', KEYS[1], ARGV[1], ARGV[6] .. '\31' .. user) == 1 then
    if name ~= '' then redis.call('HSET', KEYS[3], user, name) end
    if redis.call('HINCRBY', KEYS[2], user, 1) == 1 then
      local event = {type = 'presence_event', room = ARGV[5], event = 'join', userId = user}
      if name ~= '' then event.name = name end
      redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\np\n\n\n' .. cjson.encode(event))
    end
  end
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
return 0
