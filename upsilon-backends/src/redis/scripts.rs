//! The Lua scripts: each one atomic on the server, and as thin as it can
//! be. The reads return what the kit decides on; the writes check that
//! nothing they depend on changed since the read (compare-and-set on the
//! service's revision), or compare the lease on (holder, fence, unexpired).
//!
//! Every key a script touches is named in `KEYS` and shares the service's
//! hash tag, so each script runs on one node of a Redis Cluster.
//!
//! The time is the server's (`TIME`), in ms since the epoch. A script
//! validates everything it reads before its first write: Redis does not undo
//! the writes of a script that fails half-way.

use std::sync::LazyLock;

use redis::Script;

/// `now` in ms from `TIME`.
const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: meta, lease, history, order. What a grant is decided on: the
/// time, the lease, the format, the grant counter, the store's fence, the
/// revision, and the newest history row (the last one appended: rows are
/// written with the store's fence, which only grows).
pub(super) static READ_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
local l = redis.call('HMGET', KEYS[2], 'holder', 'fence', 'expires_at_ms', 'granted_at_ms')
local m = redis.call('HMGET', KEYS[1], 'format', 'granted', 'store', 'rev')
local last = false
local id = redis.call('LINDEX', KEYS[4], -1)
if id then last = redis.call('HGET', KEYS[3], id) end
return {t[1], t[2], l[1], l[2], l[3], l[4], m[1], m[2], m[3], m[4], last}",
    )
});

/// KEYS: meta, lease. ARGV: the format and revision the read saw ('' and
/// '0' for none), fence, holder, expiry, grant time, this build's format.
/// Writes the granted lease (expiring with it) and the grant counter if
/// neither the format nor the revision moved since the read; 1, or 0 when
/// they did.
pub(super) static GRANT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local m = redis.call('HMGET', KEYS[1], 'format', 'rev')
if (m[1] or '') ~= ARGV[1] or (m[2] or '0') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'holder', ARGV[4], 'fence', ARGV[3], 'expires_at_ms', ARGV[5], 'granted_at_ms', ARGV[6])
redis.call('PEXPIREAT', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'format', ARGV[7], 'granted', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return 1",
    )
});

/// The lease matches ARGV's holder and fence and has not expired.
const MATCHES: &str = "local l = redis.call('HMGET', KEYS[1], 'holder', 'fence', 'expires_at_ms')
local held = l[1] == ARGV[1] and l[2] == ARGV[2] and tonumber(l[3]) ~= nil and tonumber(l[3]) > now
";

/// KEYS: lease. ARGV: holder, fence, TTL in ms. The new expiry (text), or 0
/// when the lease is not held by that holder and fence.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{MATCHES}if not held then return 0 end
local at = string.format('%.0f', now + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'expires_at_ms', at)
redis.call('PEXPIREAT', KEYS[1], at)
return at"
    ))
});

/// KEYS: lease. ARGV: holder, fence, channel, service. Deletes the lease
/// and wakes waiters if it is held by that holder and fence: 1, else 0.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{MATCHES}if not held then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1"
    ))
});

/// KEYS: lease. The time and the lease.
pub(super) static CURRENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
local l = redis.call('HMGET', KEYS[1], 'holder', 'fence', 'expires_at_ms', 'granted_at_ms')
return {t[1], t[2], l[1], l[2], l[3], l[4]}",
    )
});

/// KEYS: lease. ARGV: channel, service. Deletes the lease, whoever holds
/// it, and wakes waiters if there was one; the time and the lease it
/// deleted. The grant counter, in the meta hash, stays.
pub(super) static FORCE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
local l = redis.call('HMGET', KEYS[1], 'holder', 'fence', 'expires_at_ms', 'granted_at_ms')
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return {t[1], t[2], l[1], l[2], l[3], l[4]}",
    )
});

/// KEYS: meta, state, history, order. ARGV[1]: `all`, or `some` followed
/// by the prefixes of the tasks' row ids (`VERSION TASK#`, each task's rows
/// are numbered from 1). The time, the format, the store's fence, the
/// revision, the data version, the baseline, and the rows as (id, row)
/// pairs: every row in the order written, or each task's in attempt order.
pub(super) static READ_STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
local m = redis.call('HMGET', KEYS[1], 'format', 'store', 'rev')
local s = redis.call('HMGET', KEYS[2], 'data_version', 'baseline')
local rows = {}
if ARGV[1] == 'all' then
  local ids = redis.call('LRANGE', KEYS[4], 0, -1)
  for i = 1, #ids do
    rows[#rows + 1] = ids[i]
    rows[#rows + 1] = redis.call('HGET', KEYS[3], ids[i])
  end
else
  for i = 2, #ARGV do
    local a = 1
    while true do
      local id = ARGV[i] .. a
      local r = redis.call('HGET', KEYS[3], id)
      if not r then break end
      rows[#rows + 1] = id
      rows[#rows + 1] = r
      a = a + 1
    end
  end
end
return {t[1], t[2], m[1], m[2], m[3], s[1], s[2], rows}",
    )
});

/// KEYS: meta, state, history, order. ARGV: the format, revision and store
/// fence the read saw ('', '0' and '' for none), this build's format, the
/// channel, the service to wake waiters of ('' for none), then the writes as
/// triples (op, field, value): `S` sets a field of the state hash, `H` a
/// history row, `O` appends a row id to the order list, `M` sets a field of
/// the meta hash. Writes them, raises the revision and wakes waiters only if
/// nothing moved since the read: 1, or 0 when something did.
pub(super) static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local m = redis.call('HMGET', KEYS[1], 'format', 'rev', 'store')
if (m[1] or '') ~= ARGV[1] or (m[2] or '0') ~= ARGV[2] or (m[3] or '') ~= ARGV[3] then return 0 end
local target = {S = KEYS[2], H = KEYS[3], M = KEYS[1]}
for i = 7, #ARGV, 3 do
  if not target[ARGV[i]] and ARGV[i] ~= 'O' then
    return redis.error_reply('upsilon: unknown write ' .. ARGV[i])
  end
end
for i = 7, #ARGV, 3 do
  if ARGV[i] == 'O' then
    redis.call('RPUSH', KEYS[4], ARGV[i + 2])
  else
    redis.call('HSET', target[ARGV[i]], ARGV[i + 1], ARGV[i + 2])
  end
end
redis.call('HSET', KEYS[1], 'format', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1",
    )
});

/// KEYS: meta. ARGV: the floor, this build's format. Raises the grant
/// counter to the floor (and the revision, so that a grant decided on the
/// old counter is read again) when the format is this build's or none and
/// the counter is an integer below it. Returns the format and the counter
/// as they were, for the caller to say why it did nothing. Fences are
/// compared as decimal text: Lua's numbers are doubles.
pub(super) static RAISE_FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local m = redis.call('HMGET', KEYS[1], 'format', 'granted')
local g = m[2] or '0'
if (m[1] and m[1] ~= ARGV[2]) or not string.match(g, '^%d+$') then return {m[1], m[2]} end
g = string.gsub(g, '^0+(%d)', '%1')
if #ARGV[1] > #g or (#ARGV[1] == #g and ARGV[1] > g) then
  redis.call('HSET', KEYS[1], 'format', ARGV[2], 'granted', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'rev', 1)
end
return {m[1], m[2]}",
    )
});
