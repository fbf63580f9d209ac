//! The Lua scripts that make our Redis writes atomic while keeping upstream's data
//! layout. Stored messages stay upstream's JSON array text: elements are appended and
//! removed as text (never re-encoded, so `[]` stays `[]` and key order is kept).

use std::sync::LazyLock;

use redis::Script;

/// Find the comma that ends the first element of a JSON array's body (Lua).
const FIRST_END: &str = r#"
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
"#;

/// Append `ARGV[1]` (one stored message) to the array of each field `ARGV[3..]` in
/// hash `KEYS[1]`, keeping at most `ARGV[2]` elements per field (the oldest go).
/// Returns `{stored, dropped}`: the fields appended to, and the oldest elements
/// dropped over all of them. The message travels once for the whole list of ids
/// (the driver bounds its length). A value that is not a JSON array is kept aside
/// under `<field>:corrupt` and replaced. Upstream's HGET+HSET loses concurrent
/// appends; this cannot.
pub(crate) static APPEND_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{FIRST_END}
local entry, cap = ARGV[1], tonumber(ARGV[2])
local alone = '[' .. entry .. ']'
local dropped = 0
for i = 3, #ARGV do
  local field = ARGV[i]
  -- Most ids of a big send have nothing stored yet: one command each.
  if redis.call('HSETNX', KEYS[1], field, alone) == 0 then
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
return {{#ARGV - 2, dropped}}
"#
    ))
});

/// Remove the first `ARGV[2]` elements of field `ARGV[1]` in hash `KEYS[1]` (what a
/// redelivery wrote to the socket); delete the field when nothing is left.
pub(crate) static TRIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{FIRST_END}
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local body = string.match(raw, '^%s*%[(.*)%]%s*$') or ''
local n, removed = tonumber(ARGV[2]), 0
while removed < n and body ~= '' do
  body = drop_first(body)
  removed = removed + 1
end
if body == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], '[' .. body .. ']') end
return removed
"#
    ))
});

/// Key helpers shared by the presence scripts: `ARGV[1]` is this replica's id,
/// `ARGV[2..4]` the prefixes of the ids set, the lease and the connection counter,
/// `ARGV[5]` the namespace suffix.
const REPLICA_KEYS: &str = r#"
local me = ARGV[1]
local function ids_key(r) return ARGV[2] .. r .. ARGV[5] end
local function lease_key(r) return ARGV[3] .. r .. ARGV[5] end
local function conns_key(r) return ARGV[4] .. r .. ARGV[5] end
local function held_elsewhere(id)
  for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if r ~= me and redis.call('EXISTS', lease_key(r)) == 1
       and redis.call('SISMEMBER', ids_key(r), id) == 1 then
      return true
    end
  end
  return false
end
"#;

/// This replica's last connection of `ARGV[6]` closed: forget it here, and remove it
/// from `connected_clients` (`KEYS[1]`) unless another live replica still holds it.
pub(crate) static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{REPLICA_KEYS}
redis.call('SREM', ids_key(me), ARGV[6])
if held_elsewhere(ARGV[6]) then return 0 end
redis.call('SREM', KEYS[1], ARGV[6])
return 1
"#
    ))
});

/// Renew this replica's lease (`ARGV[6]` ms), register it in `KEYS[2]`, replace its
/// ids set with `ARGV[8..]` and make sure they are all in `connected_clients`
/// (another replica's janitor or an upstream replica may have removed them), remove
/// from `connected_clients` the ids it held before but holds no more unless another
/// live replica holds them (their departure happened while Redis was unreachable,
/// so no LEAVE told it: left there, sends to them would be published to nobody
/// instead of stored), and reconcile its share of `connected_clients_count`
/// (`KEYS[3]`) with `ARGV[7]`. The lease holds `ARGV[8]`, the run id of the Redis
/// process, so that a lease restored from disk by a restarted Redis is told apart
/// from one renewed since (see [`JANITOR`]); the ids are `ARGV[9..]`.
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{REPLICA_KEYS}
redis.call('SET', lease_key(me), ARGV[8], 'PX', ARGV[6])
redis.call('SADD', KEYS[2], me)
local before = redis.call('SMEMBERS', ids_key(me))
redis.call('DEL', ids_key(me))
for i = 9, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('SADD', ids_key(me), unpack(ARGV, i, last))
  redis.call('SADD', KEYS[1], unpack(ARGV, i, last))
end
for _, id in ipairs(before) do
  if redis.call('SISMEMBER', ids_key(me), id) == 0 and not held_elsewhere(id) then
    redis.call('SREM', KEYS[1], id)
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
    ))
});

/// Clean up after replicas whose lease expired (crashed, or cut off from Redis): their
/// ids leave `connected_clients` unless a live replica holds them, and their share of
/// the connection counter is taken back. With `ARGV[6]` = "retire", this replica's own
/// lease is dropped first (graceful shutdown).
///
/// A lease that does not hold `ARGV[7]`, the run id of this Redis process, was
/// restored from disk by a Redis that restarted (append-only file or snapshot) and
/// has not been renewed since: it counts as expired. Otherwise a replica that
/// reconnects first would trust the presence of another that has not reconnected
/// yet, and publish to ids that left meanwhile instead of storing for them.
/// Returns the ids removed.
pub(crate) static JANITOR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{REPLICA_KEYS}
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
      if not held_elsewhere(id) then
        redis.call('SREM', KEYS[1], id)
        removed = removed + 1
      end
    end
    me = previous
    local counted = tonumber(redis.call('GET', conns_key(r)) or '0')
    if counted ~= 0 then redis.call('INCRBY', KEYS[3], -counted) end
    redis.call('DEL', ids_key(r), conns_key(r))
    redis.call('SREM', KEYS[2], r)
  end
end
return removed
"#
    ))
});
