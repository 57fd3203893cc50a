#!lua name=chatgw_v3
-- The gateway's Redis functions, one library loaded on every primary (FUNCTION LOAD REPLACE):
-- functions are kept with the data and replicated, so a restarted Redis or a promoted replica
-- still has them, and fred can send FCALLs in a pipeline. The version in the names changes
-- whenever a function's keys or arguments do, so nodes of two versions can run side by side.
-- Every function touches the keys of one room only, which share one hash slot.

-- What appends remember of each room's history stream in the library's own memory, so that
-- most appends make no call beyond XADD and SPUBLISH and build no string but the published
-- one: one record per room (one table lookup a message), {epoch as last read or set, messages
-- appended since it was last trimmed, its shard channel's name}; about 350 bytes a room, for at
-- most 50,000 rooms. All of it is lost whenever the library (re)loads, which is whenever Redis
-- restarts and may have lost data; a history that was recreated since (it expired) is noticed
-- because XADD NOMKSTREAM finds no stream, and the epoch is read again.
local rooms, cached = {}, 0

-- The prefix of every key of the room whose history stream is `stream`.
local function base_of(stream)
  return string.sub(stream, 1, -8)
end

-- Appends chat messages to their rooms' histories and publishes each on its room's shard
-- channel, atomically: every delivered message has an offset, and no stored message goes
-- unpublished. A message whose client id (cid) was stored recently is not stored again: the
-- original is returned instead. A node sends what it has ready as one call (in a Redis Cluster,
-- one call per hash slot), so the cost of a call is shared by its messages.
--
-- Message i (from 1) has one key, keys[i]: its room's history stream `<base>history`; the
-- room's other keys are named from it (`<base>epoch`, shard channel `<base>messages`, recent
-- cids `<base>cids` and `<base>cids-old`), which keeps the call small: every key and argument
-- is a string Redis copies into Lua, and per message that copying cost as much as the XADD.
-- args[6 + i] is its frame JSON; then, for each message with a cid in turn, user \31 cid \31
-- message id.
-- args[1] max length   args[2] history lifetime (ms)   args[3] dedup window (ms)
-- args[4] publish time (µs, the node's clock)   args[5] epoch for a history that is new
-- args[6] one digit per message: 1 to refresh its room's expiry and trim it by age (a node asks
-- for that now and then, not every message), plus 2 when it has a cid
-- Returns one string: per message 'offset epoch', or for a duplicate 'offset epoch id' of the
-- original, separated by commas (one string: Redis converts each element of a table reply at
-- the cost of several hundred instructions).
local function append(keys, args)
  local max_len = args[1]
  -- Globals are table lookups: per message they cost more than the lookups of the records.
  local call, byte = redis.call, string.byte
  -- Trimming to the length limit is the XADD's MAXLEN, given every so many messages of a
  -- room rather than every one: each argument costs, and a trim that finds a whole stream
  -- node to drop is rare. A history holds at most that many more than the limit.
  local trim_every = math.max(1, math.min(100, math.floor(tonumber(max_len) / 10)))
  local now_ms = math.floor(tonumber(args[4]) / 1000)
  local lifetime = tonumber(args[2])
  local flags = args[6]
  local header = args[4] .. '\nm\n'
  local count = #keys
  local next_cid = 7 + count
  local out = {}
  for i = 1, count do
    local stream = keys[i]
    local frame = args[6 + i]
    local flag = byte(flags, i) - 48
    local seen, cid, id, base = false, nil, nil, nil
    if flag >= 2 then
      base = base_of(stream)
      cid, id = string.match(args[next_cid], '^(.*)\31([^\31]*)$')
      next_cid = next_cid + 1
      seen = call('HGET', base .. 'cids', cid) or call('HGET', base .. 'cids-old', cid)
    end
    if seen then
      out[i] = seen
    else
      local room, epoch, offset = rooms[stream], nil, nil
      if room then
        epoch = room[1]
        local since_trim = room[2] + 1
        if since_trim >= trim_every then
          since_trim = 0
          offset = call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', max_len, '*', 'f', frame)
        else
          offset = call('XADD', stream, 'NOMKSTREAM', '*', 'f', frame)
        end
        room[2] = since_trim
      end
      if not offset then
        local epoch_key = base_of(stream) .. 'epoch'
        epoch = call('GET', epoch_key)
        if not epoch then
          -- No history (first message, expired, or Redis lost its data): a new epoch tells
          -- resuming clients that offsets from before cannot be replayed. An epoch without a
          -- stream was given by a subscribing node (head) and is kept.
          epoch = args[5]
          call('SET', epoch_key, epoch, 'PX', lifetime)
        end
        offset = call('XADD', stream, 'MAXLEN', '~', max_len, '*', 'f', frame)
        if not room then
          if cached >= 50000 then rooms, cached = {}, 0 end
          cached = cached + 1
        end
        room = {epoch, 0, base_of(stream) .. 'messages'}
        rooms[stream] = room
      end
      call('SPUBLISH', room[3], header .. offset .. '\n' .. epoch .. '\n' .. frame)
      if flag % 2 == 1 then
        call('PEXPIRE', stream, lifetime)
        call('PEXPIRE', base_of(stream) .. 'epoch', lifetime)
        call('XTRIM', stream, 'MINID', '~', tostring(now_ms - lifetime))
      end
      out[i] = offset .. ' ' .. epoch
      if cid then
        -- Two generations: a cid stays findable for at least one window and at most two. The
        -- empty field holds the current generation's birth time.
        local cids, old_cids = base .. 'cids', base .. 'cids-old'
        local window = tonumber(args[3])
        local born = tonumber(call('HGET', cids, '') or '')
        if (not born) or now_ms - born >= window then
          if born then call('RENAME', cids, old_cids) end
          call('HSET', cids, '', now_ms)
          call('PEXPIRE', cids, window * 2)
        end
        call('HSET', cids, cid, out[i] .. ' ' .. id)
      end
    end
  end
  return table.concat(out, ',')
end

-- Where a room's history ends, read by a node before it subscribes to the room: its epoch and
-- its newest offset ('' when it holds no entry). A room without history gets its epoch now, so
-- that if Redis later loses its data, the epoch a node remembers no longer matches and the
-- loss cannot pass for "nothing was published".
-- keys[1] history stream   keys[2] epoch
-- args[1] epoch to use if the room has none   args[2] its lifetime (ms), as the history's
local function head(keys, args)
  local epoch = redis.call('GET', keys[2])
  if not epoch then
    epoch = args[1]
    redis.call('SET', keys[2], epoch, 'PX', args[2])
  end
  local newest = redis.call('XREVRANGE', keys[1], '+', '-', 'COUNT', 1)[1]
  if newest then return {epoch, newest[1]} end
  return {epoch, ''}
end

-- Reads a room's history in one atomic step: its epoch, the first offset still kept and whether
-- anything was ever trimmed or has expired (so a resume can tell whether anything it missed is
-- gone), the last offset, and the entries asked for. Entries older than the history's age
-- limit are expired even while still stored (they are trimmed only now and then).
-- keys[1] history stream   keys[2] epoch
-- args[1] 'since' or 'last'   args[2] the offset (exclusive) or the count
-- args[3] the oldest offset still within the age limit
local function history(keys, args)
  local epoch = redis.call('GET', keys[2])
  if not epoch then
    return {'', '', '0-0', 0, {}}
  end
  if redis.call('EXISTS', keys[1]) == 0 then
    -- An epoch given when a node subscribed, before any message.
    return {epoch, '', '0-0', 0, {}}
  end
  local info = redis.call('XINFO', 'STREAM', keys[1])
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
  local cut = args[3]
  -- Whether stream id a is before stream id b.
  local function before(a, b)
    local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
    local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
    a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
    return a_ms < b_ms or (a_ms == b_ms and tonumber(a_seq) < tonumber(b_seq))
  end
  if first ~= '' and before(first, cut) then
    -- Some entries are past the age limit: as good as trimmed.
    trimmed = 1
    local kept = redis.call('XRANGE', keys[1], cut, '+', 'COUNT', 1)[1]
    first = kept and kept[1] or ''
  end
  local entries
  if args[1] == 'since' then
    if before(args[2], cut) then
      entries = redis.call('XRANGE', keys[1], cut, '+')
    else
      entries = redis.call('XRANGE', keys[1], '(' .. args[2], '+')
    end
  else
    entries = redis.call('XREVRANGE', keys[1], '+', cut, 'COUNT', args[2])
  end
  return {epoch, first, last, trimmed, entries}
end

-- When each room's presence keys last had their expiry refreshed, by the caller's clock, so that
-- heartbeats refresh them a few times per lifetime rather than on every beat (three calls of
-- five). Lost when the library reloads: the next beat refreshes.
local presence_refreshed, presence_cached = {}, 0

-- Announces a presence change on a room's shard channel, as a frame the nodes deliver as is.
local function announce(channel, published, room, event, user, name)
  local frame = {type = 'presence_event', room = room, event = event, userId = user}
  if name and name ~= '' then frame.name = name end
  redis.call('SPUBLISH', channel, published .. '\np\n\n\n' .. cjson.encode(frame))
end

-- Takes presence entries (node \31 user) out of a room, announcing each user who is then
-- online nowhere; returns how many users left.
local function take_offline(entries, counts, names, channel, published, room, members)
  local left = 0
  for _, member in ipairs(members) do
    if redis.call('ZREM', entries, member) == 1 then
      local user = string.match(member, '\31(.*)$')
      if redis.call('HINCRBY', counts, user, -1) <= 0 then
        local name = redis.call('HGET', names, user)
        redis.call('HDEL', counts, user)
        redis.call('HDEL', names, user)
        announce(channel, published, room, 'leave', user, name)
        left = left + 1
      end
    end
  end
  return left
end

-- Marks users online on one node until an expiry time, in one room or many (a node's heartbeat
-- sends all its rooms in a few calls rather than one call per room), announces users who were
-- not online anywhere yet, and takes offline every entry whose expiry passed (a node that
-- died), announcing who left. Used on join and, to keep entries alive, on every heartbeat.
-- Per room, keys[4r-3 .. 4r]: zset of node\31user -> expiry (ms), hash user -> entries,
-- hash user -> name, the room's shard channel.
-- args[1] expiry (ms)  args[2] key lifetime (ms)  args[3] publish time (µs)  args[4] node
-- args[5] now (ms)  then per room: its name, how many users, and that many pairs of user,
-- name ('' for none)
local function presence_upsert(keys, args)
  local expiry, lifetime, published, node, now = args[1], args[2], args[3], args[4], args[5]
  local at = 6
  for r = 4, #keys, 4 do
    local entries, counts, names, channel = keys[r - 3], keys[r - 2], keys[r - 1], keys[r]
    local room, users = args[at], tonumber(args[at + 1])
    take_offline(entries, counts, names, channel, published, room,
      redis.call('ZRANGEBYSCORE', entries, '-inf', now))
    local added = false
    for i = at + 2, at + 2 * users, 2 do
      local user, name = args[i], args[i + 1]
      if redis.call('ZADD', entries, expiry, node .. '\31' .. user) == 1 then
        added = true
        if name ~= '' then redis.call('HSET', names, user, name) end
        if redis.call('HINCRBY', counts, user, 1) == 1 then
          announce(channel, published, room, 'join', user, name)
        end
      end
    end
    at = at + 2 + 2 * users
    -- A key made by this call has no expiry yet: only a call that added someone can make one.
    local last = presence_refreshed[entries]
    if added or not last or math.abs(tonumber(now) - last) * 2 >= tonumber(lifetime) then
      for _, key in ipairs({entries, counts, names}) do redis.call('PEXPIRE', key, lifetime) end
      if presence_cached >= 50000 then presence_refreshed, presence_cached = {}, 0 end
      if not last then presence_cached = presence_cached + 1 end
      presence_refreshed[entries] = tonumber(now)
    end
  end
  return 0
end

-- Takes users of one node offline in a room (their connections all closed), and, with node '',
-- every entry whose expiry passed (a node that died). Announces each user who is then online
-- nowhere.
-- keys as one room of presence_upsert.
-- args[1] now (ms)  args[2] publish time (µs)  args[3] room  args[4] node  then users
local function presence_remove(keys, args)
  local gone = {}
  if args[4] == '' then
    gone = redis.call('ZRANGEBYSCORE', keys[1], '-inf', args[1])
  else
    for i = 5, #args do gone[#gone + 1] = args[4] .. '\31' .. args[i] end
  end
  return take_offline(keys[1], keys[2], keys[3], keys[4], args[2], args[3], gone)
end

redis.register_function('chatgw_v3_append', append)
redis.register_function('chatgw_v3_head', head)
redis.register_function{function_name = 'chatgw_v3_history', callback = history, flags = {'no-writes'}}
redis.register_function('chatgw_v3_presence_upsert', presence_upsert)
redis.register_function('chatgw_v3_presence_remove', presence_remove)
