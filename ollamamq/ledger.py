"""The shared queue's record in Redis: each change is one Lua script, so it is atomic.

Several replicas act as one fair queue through these keys (see "Several replicas" in the
README). A ticket's key is "<replica>/<number>", so whose ticket it is can be read off it.

    waiting     hash  ticket -> its request (JSON)      what the leader may grant
    active      hash  ticket -> "<backend>|<replica>|<charge>|<user>"   granted, not released
    inflight    hash  backend -> how many are active    checked by every grant
    events      stream submit / cancel / release / requeue, read by the leader
    grants:<r>  list  "<ticket> <backend>" for replica r to start
    leader      string "<replica>#<term>" with a TTL    the fencing token of a term
    replica:<r> string replica r's snapshot, with a TTL renewed by its heartbeat
"""

from __future__ import annotations

import json
import uuid
from typing import Any, NamedTuple

import redis

PREFIX = "ollamamq:"
STREAM_LENGTH = 100_000  # events kept; the leader reads them within milliseconds

_STREAM = f"'MAXLEN', '~', {STREAM_LENGTH}, '*'"

# Safe to send again: a ticket already waiting or granted is left alone.
SUBMIT = f"""
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], {_STREAM}, 'kind', 'submit', 'id', ARGV[1], 'data', ARGV[2])
return 1
"""

# 1: withdrawn; 0: already granted (the grant is on its way: the replica releases it).
CANCEL = f"""
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], {_STREAM}, 'kind', 'cancel', 'id', ARGV[1], 'data', '{{}}')
return 1
"""

# 1: granted; 0: no longer waiting; -1: the term is over (fenced); -2: the backend is full.
GRANT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[4], ARGV[3]) or '0') >= tonumber(ARGV[4]) then return -2 end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3] .. '|' .. ARGV[5] .. '|' .. ARGV[6])
redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
redis.call('RPUSH', KEYS[5], ARGV[2] .. ' ' .. ARGV[3])
return 1
"""

# Ends an active ticket: a release, or a requeue when ARGV[3] (its request) is given.
RELEASE = f"""
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], string.match(held, '^([^|]*)'), -1)
local kind = 'release'
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
  kind = 'requeue'
end
redis.call('XADD', KEYS[3], {_STREAM}, 'kind', kind, 'id', ARGV[1], 'data', ARGV[2])
return 1
"""

# Tickets of replicas whose heartbeat lapsed: actives released, waiting ones cancelled.
REAP = f"""
local reaped = {{}}
for _, replica in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. replica) == 0 then
    local mine = replica .. '/'
    local active = redis.call('HGETALL', KEYS[2])
    for i = 1, #active, 2 do
      if string.sub(active[i], 1, #mine) == mine then
        redis.call('HDEL', KEYS[2], active[i])
        redis.call('HINCRBY', KEYS[3], string.match(active[i + 1], '^([^|]*)'), -1)
        redis.call('XADD', KEYS[5], {_STREAM}, 'kind', 'release', 'id', active[i],
                   'data', '{{"reaped": true}}')
      end
    end
    for _, id in ipairs(redis.call('HKEYS', KEYS[4])) do
      if string.sub(id, 1, #mine) == mine then
        redis.call('HDEL', KEYS[4], id)
        redis.call('XADD', KEYS[5], {_STREAM}, 'kind', 'cancel', 'id', id, 'data', '{{}}')
      end
    end
    redis.call('DEL', ARGV[2] .. replica)
    redis.call('SREM', KEYS[1], replica)
    table.insert(reaped, replica)
  end
end
return reaped
"""

# The heartbeat. Answers the epoch, which changes only when Redis lost its data, and 1 if
# the replica was not listed (new, or reaped as dead: its tickets must be put back).
BEAT = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local added = redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[4], 'NX')
return {redis.call('GET', KEYS[3]), added}
"""

LEAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local holder = ARGV[1] .. '#' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], holder, 'PX', ARGV[2])
return holder
"""

RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# A new term's starting picture, in one step: the counts are rebuilt from the active set.
TAKE_OVER = """
local active = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[3])
for i = 2, #active, 2 do
  redis.call('HINCRBY', KEYS[3], string.match(active[i], '^([^|]*)'), 1)
end
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
return {redis.call('HGETALL', KEYS[1]), active, last_id, redis.call('HGETALL', KEYS[5])}
"""

# After Redis lost its data, a replica puts back what it holds; 0: no room left for it.
REASSERT_ACTIVE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
if tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
"""


SCRIPTS = {
    "SUBMIT": SUBMIT,
    "CANCEL": CANCEL,
    "GRANT": GRANT,
    "RELEASE": RELEASE,
    "REAP": REAP,
    "BEAT": BEAT,
    "LEAD": LEAD,
    "RENEW": RENEW,
    "TAKE_OVER": TAKE_OVER,
    "REASSERT_ACTIVE": REASSERT_ACTIVE,
}


def key(name: str) -> str:
    return PREFIX + name


class Op(NamedTuple):
    """One script call, kept until Redis has it: a replica sends its changes in batches."""

    script: str
    keys: list[str]
    args: list[Any]


def submit_op(ticket: str, request: dict) -> Op:
    """Put a ticket in line (again, after Redis lost it: a no-op if it is still there)."""
    keys = [key("waiting"), key("events"), key("active")]
    return Op("SUBMIT", keys, [ticket, json.dumps(request)])


def cancel_op(ticket: str) -> Op:
    """Withdraw a waiting ticket; if it was granted meanwhile, its replica releases it."""
    return Op("CANCEL", [key("waiting"), key("events")], [ticket])


def release_op(ticket: str, outcome: dict, requeue: dict | None = None) -> Op:
    """Free an active ticket's slot, or put it back in line with its request `requeue`."""
    keys = [key("active"), key("inflight"), key("events"), key("waiting")]
    again = json.dumps(requeue) if requeue is not None else ""
    return Op("RELEASE", keys, [ticket, json.dumps(outcome), again])


class Active(NamedTuple):
    """A granted ticket as the active hash records it."""

    backend: str
    replica: str
    charged: float
    user: str

    def encode(self) -> str:
        return f"{self.backend}|{self.replica}|{self.charged}|{self.user}"

    @classmethod
    def decode(cls, value: bytes) -> Active:
        backend, replica, charged, user = value.decode().split("|", 3)
        return cls(backend, replica, float(charged), user)


class Ledger:
    """The shared queue's Redis keys and the scripts that change them; no state of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._scripts = {name: self.redis.register_script(s) for name, s in SCRIPTS.items()}

    def _run(self, name: str, keys: list[str], *args: Any) -> Any:
        return self._scripts[name](keys=keys, args=list(args))

    def ping(self) -> None:
        """Raise redis.ConnectionError if Redis cannot be reached."""
        self.redis.ping()

    # -- a replica's ---------------------------------------------------------------------------

    def send(self, ops: list[Op]) -> None:
        """Run `ops` in order, in one round trip; all again, in order, after Redis lost the
        scripts (a restart): each is safe to run twice."""
        try:
            self._send(ops)
        except redis.exceptions.NoScriptError:
            for script in self._scripts.values():
                self.redis.script_load(script.script)
            self._send(ops)

    def _send(self, ops: list[Op]) -> None:
        # EVALSHA itself: a pipeline of Script objects asks SCRIPT EXISTS first, every time.
        pipe = self.redis.pipeline(transaction=False)
        for op in ops:
            pipe.evalsha(self._scripts[op.script].sha, len(op.keys), *op.keys, *op.args)
        pipe.execute()

    def next_grant(self, replica: str, timeout: float) -> tuple[str, str] | None:
        """(ticket, backend) of this replica's next grant, waiting up to `timeout` seconds."""
        popped = self.redis.blpop([key(f"grants:{replica}")], timeout=timeout)
        if popped is None:
            return None
        ticket, backend = popped[1].decode().split(" ", 1)
        return ticket, backend

    def beat(self, replica: str, snapshot: dict, ttl_s: float) -> tuple[str, bool]:
        """Renew this replica's lease: Redis's data epoch, and whether it was not listed."""
        keys = [key(f"replica:{replica}"), key("replicas"), key("epoch")]
        info = json.dumps(snapshot)
        ttl_ms = int(ttl_s * 1000)
        epoch, added = self._run("BEAT", keys, replica, info, ttl_ms, uuid.uuid4().hex)
        return epoch.decode(), bool(added)

    def leave(self, replica: str) -> None:
        """This replica stops: the leader frees what it still holds at its next reap."""
        self.redis.delete(key(f"replica:{replica}"))

    def reassert_active(self, ticket: str, active: Active, slots: int) -> bool:
        """After Redis lost its data: hold this slot again; False if the backend is full."""
        tail = active.encode().split("|", 1)[1]
        keys = [key("active"), key("inflight")]
        return bool(self._run("REASSERT_ACTIVE", keys, ticket, active.backend, slots, tail))

    def replicas(self) -> dict[str, dict]:
        """The snapshot each live replica published with its last heartbeat."""
        names = sorted(m.decode() for m in self.redis.smembers(key("replicas")))
        values = self.redis.mget([key(f"replica:{n}") for n in names]) if names else []
        return {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}

    def leader(self) -> str | None:
        holder = self.redis.get(key("leader"))
        return holder.decode() if holder else None

    def claim(self, name: str, holder: str, ttl_s: float) -> bool:
        """Whether `holder` is the first to claim `name` (a scheduled run, say) in `ttl_s`."""
        return bool(self.redis.set(key(f"claim:{name}"), holder, nx=True, ex=int(ttl_s)))

    def lock(self, name: str, timeout_s: float) -> redis.lock.Lock:
        """A lock across replicas, freed after `timeout_s` if its holder dies."""
        return self.redis.lock(key(f"lock:{name}"), timeout=timeout_s, blocking_timeout=timeout_s)

    def publish(self, topic: str) -> None:
        self.redis.publish(key("changed"), topic)

    def listen(self) -> redis.client.PubSub:
        """A subscription to what other replicas changed (see publish)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(key("changed"))
        return pubsub

    # -- the leader's --------------------------------------------------------------------------

    def lead(self, replica: str, ttl_s: float) -> str | None:
        """Begin a term if nobody holds one: its fencing token "<replica>#<term>", else None."""
        holder = self._run("LEAD", [key("leader"), key("fence")], replica, int(ttl_s * 1000))
        return holder.decode() if holder else None

    def renew(self, holder: str, ttl_s: float) -> bool:
        """Extend the term (0 s ends it); False if it is over already."""
        return bool(self._run("RENEW", [key("leader")], holder, int(ttl_s * 1000)))

    def take_over(self) -> tuple[dict[str, dict], dict[str, Active], str, dict[str, float]]:
        """(waiting, active, last event id, service counters), read at one instant."""
        keys = [key("waiting"), key("active"), key("inflight"), key("events"), key("counters")]
        waiting, active, last_id, counters = self._run("TAKE_OVER", keys)
        return (
            {k.decode(): json.loads(v) for k, v in _pairs(waiting)},
            {k.decode(): Active.decode(v) for k, v in _pairs(active)},
            last_id.decode(),
            {k.decode(): float(v) for k, v in _pairs(counters)},
        )

    def events(self, after: str, block_ms: int) -> list[tuple[str, str, str, dict]]:
        """(event id, kind, ticket, data) of the events after `after`, waiting up to block_ms."""
        answer = self.redis.xread({key("events"): after}, count=1000, block=block_ms)
        if not answer:
            return []
        return [
            (eid.decode(), f[b"kind"].decode(), f[b"id"].decode(), json.loads(f[b"data"]))
            for eid, f in answer[0][1]
        ]

    def grant(self, holder: str, ticket: str, active: Active, slots: int) -> int:
        """1 granted, 0 no longer waiting, -1 the term is over, -2 the backend is full."""
        keys = [key("leader"), key("waiting"), key("active"), key("inflight")]
        keys.append(key(f"grants:{active.replica}"))
        tail = active.encode().split("|", 2)[2]
        args = [holder, ticket, active.backend, slots, active.replica, tail]
        return int(self._run("GRANT", keys, *args))

    def inflight(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(key("inflight")).items()}

    def reap(self) -> list[str]:
        """Free what replicas with a lapsed heartbeat held; the replicas reaped."""
        keys = [key("replicas"), key("active"), key("inflight"), key("waiting"), key("events")]
        reaped = self._run("REAP", keys, key("replica:"), key("grants:"))
        return [r.decode() for r in reaped]

    def save_counters(self, counters: dict[str, float]) -> None:
        if counters:
            self.redis.hset(key("counters"), mapping=counters)


def _pairs(flat: list) -> zip:
    return zip(flat[::2], flat[1::2], strict=True)
