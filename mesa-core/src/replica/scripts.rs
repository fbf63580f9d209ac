//! The Lua scripts that make our Redis writes atomic while keeping upstream's data
//! layout, as source text: the driver loads and runs them (EVALSHA, EVAL on
//! `NOSCRIPT`), the simulator's model of Redis implements each one natively
//! (`mesa_core::sim::redis`, feature `sim`).
//!
//! Stored messages stay upstream's JSON array text: elements are appended and
//! removed as text (never re-encoded, so `[]` stays `[]` and key order is kept).

/// Find the comma that ends the first element of a JSON array's body (Lua).
macro_rules! first_end {
    () => {
        r#"
local function first_end(s)
  local depth, in_str, esc = 0, false, false
  for i = 1, #s do
    local c = string.byte(s, i)
    if in_str then
      if esc then esc = false
      elseif c == 92 then esc = true
      elseif c == 34 then in_str = false end
    elseif c == 34 then in_str = true
    elseif c == 123 or c == 91 then depth = depth + 1
    elseif c == 125 or c == 93 then depth = depth - 1
    elseif c == 44 and depth == 0 then return i end
  end
  return nil
end
local function drop_first(body)
  local cut = first_end(body)
  if cut then return string.sub(body, cut + 1) end
  return ''
end
"#
    };
}

/// Key helpers shared by the presence scripts: `ARGV[1]` is this replica's id,
/// `ARGV[2..4]` the prefixes of the ids set, the lease and the connection counter,
/// `ARGV[5]` the namespace suffix; `KEYS` are `connected_clients`, the replicas set
/// and `connected_clients_count`. `routes_key(id)` is the set of replicas holding
/// a connection of `id` (the route table, [`ROUTE`]), kept beside each replica's
/// ids set by every script that changes one.
macro_rules! replica_keys {
    () => {
        r#"
local me = ARGV[1]
local function ids_key(r) return ARGV[2] .. r .. ARGV[5] end
local function lease_key(r) return ARGV[3] .. r .. ARGV[5] end
local function conns_key(r) return ARGV[4] .. r .. ARGV[5] end
local function routes_key(id) return 'mesa_routes:' .. id .. ARGV[5] end
local function held_elsewhere(id)
  for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if r ~= me and redis.call('EXISTS', lease_key(r)) == 1
       and redis.call('SISMEMBER', ids_key(r), id) == 1 then
      return true
    end
  end
  return false
end
"#
    };
}

/// One of our scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Script {
    /// [`APPEND_MANY`].
    AppendMany,
    /// [`TRIM`].
    Trim,
    /// [`LEAVE`].
    Leave,
    /// [`RENEW`].
    Renew,
    /// [`JANITOR`].
    Janitor,
    /// [`ROOMS`].
    Rooms,
    /// [`ARRIVE`].
    Arrive,
    /// [`ROUTE`].
    Route,
    /// [`STREAM_PUBLISH`].
    StreamPublish,
    /// [`STREAM_READ`].
    StreamRead,
    /// [`PORTAL_GROUPS`].
    PortalGroups,
    /// [`PORTAL_LEASES`].
    PortalLeases,
    /// [`PORTAL_RECLAIM`].
    PortalReclaim,
}

impl Script {
    /// Every script, to load them all when the link opens.
    pub const ALL: [Script; 13] = [
        Script::AppendMany,
        Script::Trim,
        Script::Leave,
        Script::Renew,
        Script::Janitor,
        Script::Rooms,
        Script::Arrive,
        Script::Route,
        Script::StreamPublish,
        Script::StreamRead,
        Script::PortalGroups,
        Script::PortalLeases,
        Script::PortalReclaim,
    ];

    /// The Lua source.
    pub fn source(self) -> &'static str {
        match self {
            Script::AppendMany => APPEND_MANY,
            Script::Trim => TRIM,
            Script::Leave => LEAVE,
            Script::Renew => RENEW,
            Script::Janitor => JANITOR,
            Script::Rooms => ROOMS,
            Script::Arrive => ARRIVE,
            Script::Route => ROUTE,
            Script::StreamPublish => STREAM_PUBLISH,
            Script::StreamRead => STREAM_READ,
            Script::PortalGroups => PORTAL_GROUPS,
            Script::PortalLeases => PORTAL_LEASES,
            Script::PortalReclaim => PORTAL_RECLAIM,
        }
    }
}

/// Create consumer group `ARGV[1]` on every stream of `KEYS` (`XGROUP CREATE .. 0
/// MKSTREAM`: from the first entry, so events appended before any portal started
/// are handled too); a group that exists already is kept (`BUSYGROUP`). Answers how
/// many streams it went over.
pub const PORTAL_GROUPS: &str = r#"
for _, key in ipairs(KEYS) do
  local made = redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '0', 'MKSTREAM')
  if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP', 1, true) then
    return made
  end
end
return #KEYS
"#;

/// Take or renew the partition leases `KEYS` for portal `ARGV[1]`, for `ARGV[2]`
/// milliseconds (`SET NX PX` when free, `PEXPIRE` when already its own), or, with
/// `ARGV[2]` = `0`, give back those it holds. Answers, per key, 1 when the portal
/// holds it now, else 0.
pub const PORTAL_LEASES: &str = r#"
local held = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  held[i] = 0
  if ARGV[2] == '0' then
    if owner == ARGV[1] then redis.call('DEL', key) end
  elseif owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  elseif not owner then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[i] = 1
  end
end
return held
"#;

/// Reclaim the entries of stream `KEYS[1]` pending in group `ARGV[1]` for at least
/// `ARGV[3]` ms, after id `ARGV[7]` (exclusive; `-` from the start), at most
/// `ARGV[4]` of them: each delivered `ARGV[5]` times already goes to the dead-letter
/// stream `KEYS[2]` (`MAXLEN ~ ARGV[6]`, with `stream`, `id`, `deliveries` and
/// `reason` fields before its own) and is acknowledged; the others are claimed for
/// consumer `ARGV[2]` (`XCLAIM`, which counts one more delivery). Answers
/// `{scanned, dead-lettered, lost, last id scanned or '', claimed entries, their
/// delivery counts}`; lost are entries trimmed from the stream before they were handled.
pub const PORTAL_RECLAIM: &str = r#"
local start = ARGV[7]
if start ~= '-' then start = '(' .. start end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], start, '+', ARGV[4])
local claim, counts, dead, last = {}, {}, 0, ''
for _, p in ipairs(pending) do
  local id, deliveries = p[1], p[4]
  last = id
  if deliveries >= tonumber(ARGV[5]) then
    local moved = {'stream', KEYS[1], 'id', id, 'deliveries', tostring(deliveries),
                   'reason', 'delivered ' .. deliveries .. ' times'}
    local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
    if entry then
      for _, v in ipairs(entry[2]) do table.insert(moved, v) end
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', unpack(moved))
    redis.call('XACK', KEYS[1], ARGV[1], id)
    dead = dead + 1
  else
    table.insert(claim, id)
    counts[id] = deliveries + 1
  end
end
local claimed, delivered = {}, {}
if #claim > 0 then
  for _, entry in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(claim))) do
    if entry then
      table.insert(claimed, entry)
      table.insert(delivered, counts[entry[1]])
    end
  end
end
return {#pending, dead, #claim - #claimed, last, claimed, delivered}
"#;

/// Append `ARGV[1]` (one stored message) to the array of each field `ARGV[3..]` in
/// hash `KEYS[1]`, keeping at most `ARGV[2]` elements per field (the oldest go).
/// The message travels once for the whole list of ids (at most
/// [`IDS_PER_COMMAND`](crate::cluster::IDS_PER_COMMAND)). A value that is not a
/// JSON array is kept aside under `<field>:corrupt` and replaced. Upstream's
/// HGET+HSET loses concurrent appends; this cannot.
///
/// An id in `connected_clients` (`KEYS[2]`) by now is not stored for: it connected
/// since the presence check, and its connection may have read its stored messages
/// already (a connection's id arrives there before it reads them), so stored now,
/// the message would wait for its next connection. It is returned instead, for the
/// caller to publish to.
///
/// Returns `{stored, dropped, online...}`: the fields appended to, the oldest
/// elements dropped over all of them, and the ids found connected.
pub const APPEND_MANY: &str = concat!(
    first_end!(),
    r#"
local entry, cap = ARGV[1], tonumber(ARGV[2])
local alone = '[' .. entry .. ']'
local reply = {0, 0}
local dropped = 0
for i = 3, #ARGV do
  local field = ARGV[i]
  if redis.call('SISMEMBER', KEYS[2], field) == 1 then
    reply[#reply + 1] = field
  -- Most ids of a big send have nothing stored yet: one command each.
  elseif redis.call('HSETNX', KEYS[1], field, alone) == 0 then
    local raw = redis.call('HGET', KEYS[1], field)
    local body, count = '', 0
    local ok, decoded = pcall(cjson.decode, raw)
    local inner = string.match(raw, '^%s*%[(.*)%]%s*$')
    if ok and type(decoded) == 'table' and inner then
      count = #decoded
      body = inner
    else
      redis.call('HSET', KEYS[1], field .. ':corrupt', raw)
    end
    while count >= cap and body ~= '' do
      body = drop_first(body)
      count = count - 1
      dropped = dropped + 1
    end
    if body == '' then body = entry else body = body .. ',' .. entry end
    redis.call('HSET', KEYS[1], field, '[' .. body .. ']')
  end
end
reply[1] = #ARGV - 2 - (#reply - 2)
reply[2] = dropped
return reply
"#
);

/// Remove the entries of field `ARGV[1]` in hash `KEYS[1]` up to and including the
/// last one, among the first `ARGV[2]`, whose text is `ARGV[3]`: what a redelivery
/// wrote to the socket, ending with that entry. Found by its text, so that what
/// another connection's redelivery already removed, or the per-id cap pushed out,
/// is not removed again in its place: the entries appended since stay. Deletes the
/// field when nothing is left. Returns the entries removed.
pub const TRIM: &str = concat!(
    first_end!(),
    r#"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local cursor = string.match(raw, '^%s*%[(.*)%]%s*$') or ''
local n, seen, removed, rest = tonumber(ARGV[2]), 0, 0, nil
while seen < n and cursor ~= '' do
  local cut = first_end(cursor)
  local entry, after = cursor, ''
  if cut then
    entry = string.sub(cursor, 1, cut - 1)
    after = string.sub(cursor, cut + 1)
  end
  seen = seen + 1
  if entry == ARGV[3] then
    removed = seen
    rest = after
  end
  cursor = after
end
if not rest then return 0 end
if rest == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], '[' .. rest .. ']') end
return removed
"#
);

/// This replica's last connection of `ARGV[6]` closed: forget it here (and its
/// route), and remove it from `connected_clients` (`KEYS[1]`) unless another live
/// replica still holds it.
pub const LEAVE: &str = concat!(
    replica_keys!(),
    r#"
redis.call('SREM', ids_key(me), ARGV[6])
redis.call('SREM', routes_key(ARGV[6]), me)
if held_elsewhere(ARGV[6]) then return 0 end
redis.call('SREM', KEYS[1], ARGV[6])
return 1
"#
);

/// Renew this replica's lease (`ARGV[6]` ms), register it in `KEYS[2]`, replace its
/// ids set (and its routes: added for the ids not in the set before, removed for
/// those gone) with `ARGV[9..]` and make sure they are all in `connected_clients`
/// (another replica's janitor or an upstream replica may have removed them), remove
/// from `connected_clients` the ids it held before but holds no more unless another
/// live replica holds them (their departure happened while Redis was unreachable,
/// so no LEAVE told it: left there, sends to them would be published to nobody
/// instead of stored), and reconcile its share of `connected_clients_count`
/// (`KEYS[3]`) with `ARGV[7]`. The lease holds `ARGV[8]`, the run id of the Redis
/// process, so that a lease restored from disk by a restarted Redis is told apart
/// from one renewed since (see [`JANITOR`]).
pub const RENEW: &str = concat!(
    replica_keys!(),
    r#"
redis.call('SET', lease_key(me), ARGV[8], 'PX', ARGV[6])
redis.call('SADD', KEYS[2], me)
local before = redis.call('SMEMBERS', ids_key(me))
redis.call('DEL', ids_key(me))
for i = 9, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('SADD', ids_key(me), unpack(ARGV, i, last))
  redis.call('SADD', KEYS[1], unpack(ARGV, i, last))
end
-- Routes only for the ids new here: nobody else changes this replica's routes
-- (its janitor removes them with its ids set, which `before` then lacks).
local had = {}
for _, id in ipairs(before) do had[id] = true end
for i = 9, #ARGV do
  if not had[ARGV[i]] then redis.call('SADD', routes_key(ARGV[i]), me) end
end
for _, id in ipairs(before) do
  if redis.call('SISMEMBER', ids_key(me), id) == 0 then
    redis.call('SREM', routes_key(id), me)
    if not held_elsewhere(id) then redis.call('SREM', KEYS[1], id) end
  end
end
local counted = tonumber(redis.call('GET', conns_key(me)) or '0')
local now = tonumber(ARGV[7])
if counted ~= now then
  redis.call('INCRBY', KEYS[3], now - counted)
  redis.call('SET', conns_key(me), now)
end
return 1
"#
);

/// Clean up after replicas whose lease expired (crashed, or cut off from Redis): their
/// routes go, their ids leave `connected_clients` unless a live replica holds them,
/// their share of the connection counter is taken back, and their room memberships
/// leave the rooms (an id with no connection left in a room is published as left, as
/// by [`ROOMS`]). With `ARGV[6]` = "retire", this replica's own
/// lease is dropped first (graceful shutdown).
///
/// A lease that does not hold `ARGV[7]`, the run id of this Redis process, was
/// restored from disk by a Redis that restarted (append-only file or snapshot) and
/// has not been renewed since: it counts as expired. Otherwise a replica that
/// reconnects first would trust the presence of another that has not reconnected
/// yet, and publish to ids that left meanwhile instead of storing for them.
/// Returns the ids removed.
pub const JANITOR: &str = concat!(
    replica_keys!(),
    r#"
if ARGV[6] == 'retire' then redis.call('DEL', lease_key(me)) end
if ARGV[7] ~= '' then
  for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local held = redis.call('GET', lease_key(r))
    if r ~= me and held and held ~= ARGV[7] then redis.call('DEL', lease_key(r)) end
  end
end
local removed = 0
for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', lease_key(r)) == 0 then
    local previous = me
    me = r
    for _, id in ipairs(redis.call('SMEMBERS', ids_key(r))) do
      redis.call('SREM', routes_key(id), r)
      if not held_elsewhere(id) then
        redis.call('SREM', KEYS[1], id)
        removed = removed + 1
      end
    end
    me = previous
    local counted = tonumber(redis.call('GET', conns_key(r)) or '0')
    if counted ~= 0 then redis.call('INCRBY', KEYS[3], -counted) end
    -- Its room memberships leave each room's presence.
    local held = 'mesa_replica_rooms:' .. r .. ARGV[5]
    local entries = redis.call('HGETALL', held)
    for i = 1, #entries, 2 do
      local cut = string.find(entries[i], ' ', 1, true)
      if cut then
        local members = 'mesa_room_members:' .. string.sub(entries[i], 1, cut - 1) .. ARGV[5]
        local id = string.sub(entries[i], cut + 1)
        if redis.call('HINCRBY', members, id, -tonumber(entries[i + 1])) <= 0 then
          redis.call('HDEL', members, id)
          local room = string.sub(entries[i], 1, cut - 1)
          redis.call('PUBLISH', 'mesa_room:' .. room .. ARGV[5], cjson.encode({room = room, leave = id}))
        end
      end
    end
    redis.call('DEL', held)
    redis.call('DEL', ids_key(r), conns_key(r))
    redis.call('SREM', KEYS[2], r)
  end
end
return removed
"#
);

/// Room presence of this replica: `KEYS[1]` is its hash of memberships (field
/// `<room> <id>`, the connections of that id in that room here; room names have no
/// space), `ARGV[1]` the namespace suffix, `ARGV[2]` the mode, then triples of room,
/// id and count, added (negative to leave). `clear` (a new link) makes the hash hold
/// exactly the triples instead: what Redis kept may be stale, or lost. Either way the
/// difference goes to each room's hash of members (`mesa_room_members:<room>`, id to
/// connections over the cluster), where an id at 0 is removed. A leave the hash never
/// saw (Redis lost it) removes nothing.
///
/// When an id's connections in a room go from 0, or to 0, the change is published
/// on the room's channel (`{"room": R, "join": id}`, `{"room": R, "leave": id}`), in
/// the same step, so every replica hears each room's changes once and in order. A
/// `clear` changes only the difference: a link that comes back to a Redis that kept
/// its data publishes nothing. Returns the entries changed.
pub const ROOMS: &str = r#"
local function apply(room, id, by)
  if by == 0 then return 0 end
  local field = room .. ' ' .. id
  local mine = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if mine + by < 0 then by = -mine end
  if by == 0 then return 0 end
  if mine + by == 0 then redis.call('HDEL', KEYS[1], field)
  else redis.call('HSET', KEYS[1], field, mine + by) end
  local members = 'mesa_room_members:' .. room .. ARGV[1]
  local now = redis.call('HINCRBY', members, id, by)
  local channel = 'mesa_room:' .. room .. ARGV[1]
  if now <= 0 then
    redis.call('HDEL', members, id)
    redis.call('PUBLISH', channel, cjson.encode({room = room, leave = id}))
  elseif now == by then
    redis.call('PUBLISH', channel, cjson.encode({room = room, join = id}))
  end
  return 1
end
local changed = 0
local wanted = {}
if ARGV[2] == 'clear' then
  for i = 3, #ARGV, 3 do
    local field = ARGV[i] .. ' ' .. ARGV[i + 1]
    local prior = wanted[field]
    wanted[field] = {ARGV[i], ARGV[i + 1], (prior and prior[3] or 0) + tonumber(ARGV[i + 2])}
  end
  local entries = redis.call('HGETALL', KEYS[1])
  for i = 1, #entries, 2 do
    local cut = string.find(entries[i], ' ', 1, true)
    local want = wanted[entries[i]]
    local count = want and want[3] or 0
    wanted[entries[i]] = nil
    if cut then
      local room, id = string.sub(entries[i], 1, cut - 1), string.sub(entries[i], cut + 1)
      changed = changed + apply(room, id, count - tonumber(entries[i + 1]))
    else
      redis.call('HDEL', KEYS[1], entries[i])
    end
  end
  for _, want in pairs(wanted) do changed = changed + apply(want[1], want[2], want[3]) end
else
  for i = 3, #ARGV, 3 do changed = changed + apply(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])) end
end
return changed
"#;

/// The first connections of the ids `ARGV[6..]` here authenticated: each goes to
/// `connected_clients` (`KEYS[1]`), this replica's ids set, and its route.
pub const ARRIVE: &str = concat!(
    replica_keys!(),
    r#"
for i = 6, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('SADD', ids_key(me), ARGV[i])
  redis.call('SADD', routes_key(ARGV[i]), me)
end
return #ARGV - 5
"#
);

/// Route an envelope to the replicas holding its ids (routing by interest): for
/// each id `ARGV[8..]`, the live replicas (their lease exists) in its route table;
/// then one `PUBLISH` per replica, on its channel (`mesa_replica:<r>`), of the
/// envelope `ARGV[6] .. ids .. ARGV[7]` naming that replica's ids (see
/// [`Envelope::halves`](crate::cluster::Envelope::halves)), in the replicas' order.
/// An id held nowhere is published to nobody, as it is on `ws`. Returns
/// `{replicas published to, ids held nowhere}`.
pub const ROUTE: &str = concat!(
    replica_keys!(),
    r#"
local shares, order, live, nowhere = {}, {}, {}, 0
for i = 8, #ARGV do
  local held = false
  for _, r in ipairs(redis.call('SMEMBERS', routes_key(ARGV[i]))) do
    if live[r] == nil then live[r] = redis.call('EXISTS', lease_key(r)) == 1 end
    if live[r] then
      if not shares[r] then shares[r] = {}; order[#order + 1] = r end
      local share = shares[r]
      share[#share + 1] = cjson.encode(ARGV[i])
      held = true
    end
  end
  if not held then nowhere = nowhere + 1 end
end
table.sort(order)
for _, r in ipairs(order) do
  local envelope = ARGV[6] .. table.concat(shares[r], ',') .. ARGV[7]
  redis.call('PUBLISH', 'mesa_replica:' .. r .. ARGV[5], envelope)
end
return {#order, nowhere}
"#
);

/// The meta record of a recoverable room's stream (`KEYS[2]`: epoch `e`, last
/// offset `s`, and `r`, the run id of the Redis process that last wrote it), kept
/// for `ttl` seconds from now. A new epoch (an empty stream `KEYS[1]`, offsets
/// from one) starts when the record is missing, and when the caller's link names another
/// Redis process (`run`; `''`: unknown, as for a dispatcher): after a failover the
/// new primary may lack the last appends and would number new messages with their
/// offsets, so a position from before never resumes as if nothing was missed; a
/// restart that kept everything starts one needlessly. An epoch is the time of this
/// Redis process in microseconds and a counter of this Redis (`KEYS[3]`), so it
/// never repeats, even after a Redis restart that lost the record.
macro_rules! stream_meta {
    () => {
        r#"
local function meta(ttl, run)
  local held = redis.call('HMGET', KEYS[2], 'e', 'r')
  local epoch, writer = held[1], held[2]
  if epoch and run ~= '' and writer and writer ~= run then epoch = false end
  if not epoch then
    local now = redis.call('TIME')
    epoch = string.format('%x%06x', tonumber(now[1]), tonumber(now[2]))
      .. '-' .. redis.call('INCR', KEYS[3])
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
  end
  if run ~= '' and writer ~= run then redis.call('HSET', KEYS[2], 'r', run) end
  redis.call('EXPIRE', KEYS[2], ttl)
  return epoch
end
"#
    };
}

/// Append a message to a recoverable room's stream and publish it, in one step, so
/// offsets are contiguous and the stream's order is the channel's. `KEYS`: the
/// stream, its meta record, the epoch counter, the room's channel; `ARGV`: the meta
/// record's TTL (s), the message (`{"op","d","t"}`), the stream's size, its TTL (s),
/// the room's envelope without its closing brace, which the script completes with
/// `,"epoch":E,"offset":O}`, and the run id of the caller's Redis process. The entry's
/// id is its offset (`O-0`). A stream left from an epoch whose meta record expired is
/// dropped first. Returns `{epoch, offset}`.
pub const STREAM_PUBLISH: &str = concat!(
    stream_meta!(),
    r#"
local epoch = meta(ARGV[1], ARGV[6])
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0', 'm', ARGV[2])
if type(added) == 'table' and added.err then
  redis.call('DEL', KEYS[1])
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0', 'm', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[4], ARGV[5] .. ',"epoch":"' .. epoch .. '","offset":' .. offset .. '}')
return {epoch, offset}
"#
);

/// Read a recoverable room's stream after offset `ARGV[2]` (`''`: read nothing, only
/// the position), at most `ARGV[3]` entries. `KEYS`: the stream, its meta record,
/// the epoch counter; `ARGV[1]`: the meta record's TTL (s), `ARGV[4]` the run id of
/// the caller's Redis process. A missing meta record
/// is created (a new epoch), so a client that got nothing yet learns a position it
/// can resume from. Returns `{epoch, last offset, entries}` (entries as `XRANGE`
/// gives them).
pub const STREAM_READ: &str = concat!(
    stream_meta!(),
    r#"
local epoch = meta(ARGV[1], ARGV[4])
local top = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local entries = {}
if ARGV[2] ~= '' and tonumber(ARGV[2]) < top then
  entries = redis.call('XRANGE', KEYS[1], (tonumber(ARGV[2]) + 1) .. '-0', '+', 'COUNT', ARGV[3])
end
return {epoch, top, entries}
"#
);
