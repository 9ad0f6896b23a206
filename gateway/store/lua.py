"""The Redis side's atomic steps: one Lua script each, so no step is ever half done.

Times come from Redis (``TIME``, milliseconds), so every worker and host judges deadlines by one
clock. Each refresh-record script touches only keys with the family's ``{root}`` hash tag, so it
runs on one Redis Cluster slot. docs/refresh.md tells which move of the refresh token each makes.
"""

# SET and PUBLISH in one script, so a waiter that sees the announcement always finds the value.
SET_NOTIFY = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# Idempotent for the holder, so a retry after a lost reply finds the lock its own.
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Compare-and-set: a session record is written only over the value its writer read (gateway.sessions).
REPLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], ARGV[3])
    return 1
end
return 0
"""

# Add to an expiring set (a sorted set scored by expiry), drop what has expired, keep the key
# as long as its longest member, and announce: one atomic step.
ADD_MEMBER = """
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
    redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(last[2]) * 1000))
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# --- refresh records (docs/refresh.md): every state change of a refresh token is one script, on
# keys that share the family's hash tag. Times are Redis's own clock (TIME), in milliseconds, so
# workers on hosts with different clocks agree on deadlines and grace periods. Redis 7 replicates
# scripts by their effects, which is what lets a script that read TIME write afterwards.

NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: ended, result, used, attempt, issued
READ_RECORD = (
    NOW
    + """
local used = redis.call('HMGET', KEYS[3], 'v', 'at')
return {now, redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), used[1], used[2],
        redis.call('HGETALL', KEYS[4]), redis.call('GET', KEYS[5])}
"""
)

# KEYS: lock, attempt, ended, used   ARGV: owner, fence, window ms, ttl ms, fence to take over ('' none)
BEGIN_ATTEMPT = (
    NOW
    + """
local current = redis.call('HMGET', KEYS[2], 'fence', 'state', 'started')
if current[1] == ARGV[2] then
    -- The same call again (redis-py retries once after a reset): it happened, answer as the first time.
    if current[2] == 'pending' then return tonumber(current[3]) end
    -- Settled already: this copy ran late, after its owner gave up on it and cleared it (SETTLE_ATTEMPT).
    return false
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return false end
local open = current[1] and current[2] ~= 'done' and current[2] ~= 'cleared'
if open and current[1] ~= ARGV[5] then return false end
local retried = (ARGV[5] ~= '' and open) and '1' or '0'
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'fence', ARGV[2], 'started', now, 'deadline', now + tonumber(ARGV[3]),
           'state', 'pending', 'retried', retried)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return now
"""
)

# KEYS: attempt   ARGV: fence, 'maybe' | 'clear'
# A retry took over an attempt whose answer was lost: that the retry never left does not mean the
# first one never did, so "clear" leaves it "maybe" (still retried: it is never sent a third time).
# Clearing an attempt (there or not yet) leaves the fence behind, "cleared", for longer than any
# lease (lock_lease is at most 60 s): the owner's BEGIN_ATTEMPT whose reply timed out may still be on
# its way, and must not record a pending attempt nobody will settle (taken, past its deadline, for a
# lost answer: a logout although the IdP never saw the token). Read as no attempt at all.
SETTLE_ATTEMPT = """
local current = redis.call('HMGET', KEYS[1], 'fence', 'retried', 'state')
if current[1] and current[1] ~= ARGV[1] then return 0 end
if current[3] == 'cleared' then return 1 end
if ARGV[2] == 'clear' and current[2] ~= '1' then
    -- Cleared or never there: the fence stays behind (a copy of BEGIN_ATTEMPT may still run after this).
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'state', 'cleared')
    redis.call('PEXPIRE', KEYS[1], 120000)
elseif current[1] then
    redis.call('HSET', KEYS[1], 'state', 'maybe')
else
    return 0
end
return 1
"""

# KEYS: attempt, ended, used, members, then the write keys
# ARGV: fence, channel, announced key, used value ('' none), used ttl ms, member ('' none), member exp (epoch s),
#       then value and ttl ms for each write key
FINISH = (
    NOW
    + """
local current = redis.call('HMGET', KEYS[1], 'fence', 'state')
-- Another fence: the attempt was taken over. No attempt at all: the store lost it (a restart without
-- persistence, a failover) while the IdP redeemed the token, so the successor is written out all the same.
if current[1] and current[1] ~= ARGV[1] then return 'superseded' end
-- Without an attempt, a successor recorded already is someone else's (its attempt expired) unless it is ours.
if not current[1] then
    local prior = redis.call('HGET', KEYS[3], 'v')
    if prior then return prior == ARGV[4] and 'ok' or 'superseded' end
end
if current[2] == 'done' then return 'ok' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'ended' end
for i = 5, #KEYS do
    redis.call('SET', KEYS[i], ARGV[8 + (i - 5) * 2], 'PX', ARGV[9 + (i - 5) * 2])
end
if ARGV[4] ~= '' then
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], 'v', ARGV[4], 'at', now)
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
if ARGV[6] ~= '' then
    redis.call('ZADD', KEYS[4], 'GT', ARGV[7], ARGV[6])
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now / 1000)
    local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
    if last[2] then redis.call('PEXPIREAT', KEYS[4], math.ceil(tonumber(last[2]) * 1000)) end
end
if current[1] then redis.call('HSET', KEYS[1], 'state', 'done') end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 'ok'
"""
)

# KEYS: ended, members, head   ARGV: reason, ttl ms, now (epoch s)
END_FAMILY = """
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local reason = first and ARGV[1] or redis.call('GET', KEYS[1])
return {first and 1 or 0, reason, redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[3], '+inf', 'WITHSCORES'),
        redis.call('GET', KEYS[3])}
"""
