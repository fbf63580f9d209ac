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

/// The presence scripts are the core's, as they are: this replica's last connection
/// of an id closed ([`mesa_core::replica::scripts::LEAVE`]).
pub(crate) static LEAVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(mesa_core::replica::scripts::LEAVE));

/// Renew this replica's lease and presence
/// ([`mesa_core::replica::scripts::RENEW`]).
pub(crate) static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(mesa_core::replica::scripts::RENEW));

/// Clean up after replicas whose lease expired
/// ([`mesa_core::replica::scripts::JANITOR`]).
pub(crate) static JANITOR: LazyLock<Script> =
    LazyLock::new(|| Script::new(mesa_core::replica::scripts::JANITOR));
