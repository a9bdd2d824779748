"""Lua scripts of the Redis store: each one is atomic, so ownership checks and writes cannot interleave.

Lease expiry uses the Redis server's clock (``TIME``), so replicas' clocks do not need to agree on leases.
Keys are ``<prefix>:s:<sid>`` (record hash), ``<prefix>:t:<sid>`` (token log stream), ``<prefix>:live``
(sorted set: running stream -> owner lease expiry, ms), ``<prefix>:drv:<engine>`` (driver lease) and
``<prefix>:pub:<engine>`` (hash: replica -> its published stream states); ``<prefix>:sum:<engine>`` (the engine's
summary for placement, written by its driver) is a plain key. Ids are validated before use.
"""

from enum import IntEnum


class Refused(IntEnum):
    """Why a write script (CREATE, APPEND, END) did not write; any other result is what it stored."""

    NOT_OWNER = -1  # another replica owns the stream
    GAP = -2  # APPEND: the log does not end where this write starts (earlier writes were dropped)
    GONE = -3  # the record is gone: Redis lost its data


NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: record, live. ARGV: me, record json, lease ttl ms, sid. Idempotent: a retried create keeps the log.
CREATE = NOW + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if redis.call('EXISTS', KEYS[1]) == 1 then
  if owner ~= ARGV[1] then return -1 end
  redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[3]), ARGV[4])
  return tonumber(redis.call('HGET', KEYS[1], 'n'))
end
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'state', 'running', 'n', 0, 'owner', ARGV[1])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[3]), ARGV[4])
return 0
"""

# KEYS: record, log. ARGV: me, first index, payload, token count.
# Returns the stored token count, or Refused: -1 (another owner), -2 (gap), -3 (record gone: Redis lost its data).
APPEND = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
  return -1
end
if owner ~= ARGV[1] then return -1 end
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
local start = tonumber(ARGV[2])
local cnt = tonumber(ARGV[4])
if n >= start + cnt then return n end
if n ~= start then return -2 end
redis.call('XADD', KEYS[2], '*', 'd', ARGV[3])
redis.call('HSET', KEYS[1], 'n', start + cnt)
return start + cnt
"""

# KEYS: record, log, live. ARGV: me, final json, ttl ms, sid, new state (finished | detached).
END = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  if redis.call('EXISTS', KEYS[1]) == 0 then return -3 end
  return -1
end
if owner ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'state', ARGV[5])
redis.call('HDEL', KEYS[1], 'owner')
if ARGV[5] == 'finished' then
  redis.call('HSET', KEYS[1], 'final', ARGV[2])
  redis.call('XADD', KEYS[2], '*', 'f', ARGV[2])
else
  redis.call('XADD', KEYS[2], '*', 'x', '1')  -- followers learn that nobody generates it any more
end
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# KEYS: live. ARGV: me, ttl ms, prefix, sid... Returns {lost, missing}.
RENEW = NOW + """
local now = now_ms()
local lost, missing = {}, {}
for i = 4, #ARGV do
  local sid = ARGV[i]
  local k = ARGV[3] .. ':s:' .. sid
  local o = redis.call('HGET', k, 'owner')
  if o == ARGV[1] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), sid)
  elseif (not o) and redis.call('EXISTS', k) == 0 then
    table.insert(missing, sid)
  else
    table.insert(lost, sid)
  end
end
return {lost, missing}
"""

# KEYS: live. ARGV: me, ttl ms, prefix, limit, allow expired leases ('1'/'0'), [sid].
# Without sid: take over running streams whose owner's lease expired. With sid: that stream, if detached
# (or expired). Returns the sids now owned by me.
CLAIM = NOW + """
local now = now_ms()
local cands
if ARGV[6] then
  cands = {ARGV[6]}
else
  if ARGV[5] ~= '1' then return {} end
  cands = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
end
local out = {}
for _, sid in ipairs(cands) do
  local k = ARGV[3] .. ':s:' .. sid
  local st = redis.call('HGET', k, 'state')
  if not st then
    redis.call('ZREM', KEYS[1], sid)
  else
    local ok = false
    if st == 'detached' then
      ok = true
    elseif st == 'running' and ARGV[5] == '1' then
      local sc = redis.call('ZSCORE', KEYS[1], sid)
      if (not sc) or tonumber(sc) <= now then ok = true end
    end
    if ok then
      redis.call('HSET', k, 'owner', ARGV[1], 'state', 'running')
      redis.call('PERSIST', k)
      redis.call('PERSIST', ARGV[3] .. ':t:' .. sid)
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), sid)
      table.insert(out, sid)
    end
  end
end
return out
"""

# KEYS: driver lease. ARGV: me, ttl ms. 1 if I drive the engine now.
DRIVER = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""

# KEYS: driver lease. ARGV: me. Give the lease up (clean shutdown) so another replica drives at once.
RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

# KEYS: live. ARGV: me, prefix, sid... Expire my stream leases now (clean shutdown): others take over at once.
YIELD = """
local n = 0
for i = 3, #ARGV do
  local sid = ARGV[i]
  if redis.call('HGET', ARGV[2] .. ':s:' .. sid, 'owner') == ARGV[1] then
    redis.call('ZADD', KEYS[1], 0, sid)
    n = n + 1
  end
end
return n
"""

ALL = {"CREATE": CREATE, "APPEND": APPEND, "END": END, "RENEW": RENEW, "CLAIM": CLAIM, "DRIVER": DRIVER,
       "RESIGN": RESIGN, "YIELD": YIELD}
