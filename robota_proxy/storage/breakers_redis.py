"""Circuit breakers in Redis, shared by every proxy process that uses the same server.

With several processes, per-process breakers each learn about a dead target separately (N
processes send N times the failures before all of them skip it) and each send their own probe
after the cool-down. Here one breaker per target lives in one Redis hash,
``<prefix>:breaker:<target>:state`` (the prefix is ``ROBOTA_REDIS_PREFIX``), and every decision
is one Lua script, so it is atomic across processes: exactly one caller anywhere gets the probe.
The rules, the window buckets and the log lines are those of
``robota_proxy.upstreams.breakers.MemoryBreakers``.

The hash holds ``state`` (absent means closed), ``fails`` (consecutive failures),
``opened_at``, ``probe_until``, and the error-rate window as a ring of ``WINDOW_BUCKETS``
slots (``b<i>`` the bucket number, ``c<i>`` calls, ``f<i>`` failures), so its size is fixed
whatever the traffic. Closing deletes it: closed with nothing counted is the default. Every
write renews its expiry (window + cool-down + probe timeout), so a target no longer used leaves
nothing behind, and an open breaker cannot expire before its probe could have run.

Times are Redis's own clock (``TIME`` in the script), so processes on hosts whose clocks
disagree still agree on when a cool-down ends; ``clock=`` passes a time instead (tests).

When Redis cannot be reached, or does not answer within ``timeout`` (0.5 s), breakers fail
open: ``allow`` answers True, outcomes are dropped, and a warning is logged at most once per
interval. Skipping a target needs the evidence, and
refusing every target because the breakers' store is down would turn a Redis outage into a full
one. Nothing here raises to the caller except cancellation. The client is the caller's: it is
not closed here. Imported only when Redis is configured (the ``[redis]`` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis

from robota_proxy.observability.throttled_log import ThrottledLog
from robota_proxy.upstreams.breakers import (
    WINDOW_BUCKETS,
    BreakerPolicy,
    BreakerState,
    OnChange,
    announce,
)

log = logging.getLogger("robota_proxy.redis")

_PART = "circuit breakers"

# ARGV[1] is the time in seconds, or "" for the server's clock.
_NOW = """
local function now_()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.6f', x) end
"""

# ARGV: now, cooldown, probe timeout, ttl ms.
# Returns {0 refused | 1 closed | 2 probe, just half-open | 3 probe, the last one was lost, fails}.
_ALLOW = (
    _NOW
    + """
local key = KEYS[1]
local h = redis.call('HMGET', key, 'state', 'opened_at', 'probe_until', 'fails')
local state = h[1]
if not state or state == 'closed' then return {1, 0} end
local fails = tonumber(h[4]) or 0
local now = now_()
if state == 'open' then
  if now < tonumber(h[2]) + tonumber(ARGV[2]) then return {0, fails} end
  redis.call('HSET', key, 'state', 'half_open', 'probe_until', num(now + tonumber(ARGV[3])))
  redis.call('PEXPIRE', key, ARGV[4])
  return {2, fails}
end
if now < (tonumber(h[3]) or 0) then return {0, fails} end
redis.call('HSET', key, 'probe_until', num(now + tonumber(ARGV[3])))
redis.call('PEXPIRE', key, ARGV[4])
return {3, fails}
"""
)

# count(key, now, failed): one call (failed 1 or 0) into the ring's current bucket, which is
# reset first when it still holds an older bucket; returns calls, failed over the window.
# ARGV[2] is the bucket width in seconds.
_COUNT = """
local function count(key, now, failed)
  local n = BUCKETS
  local current = math.floor(now / tonumber(ARGV[2]))
  local slot = current % n
  if tonumber(redis.call('HGET', key, 'b' .. slot)) ~= current then
    redis.call('HSET', key, 'b' .. slot, current, 'c' .. slot, 1, 'f' .. slot, failed)
  else
    redis.call('HINCRBY', key, 'c' .. slot, 1)
    if failed == 1 then redis.call('HINCRBY', key, 'f' .. slot, 1) end
  end
  local fields = {}
  for i = 0, n - 1 do
    fields[#fields + 1] = 'b' .. i
    fields[#fields + 1] = 'c' .. i
    fields[#fields + 1] = 'f' .. i
  end
  local v = redis.call('HMGET', key, unpack(fields))
  local calls, bad = 0, 0
  for i = 0, n - 1 do
    local b = tonumber(v[3 * i + 1])
    if b and b > current - n and b <= current then
      calls = calls + (tonumber(v[3 * i + 2]) or 0)
      bad = bad + (tonumber(v[3 * i + 3]) or 0)
    end
  end
  return calls, bad
end
""".replace("BUCKETS", str(WINDOW_BUCKETS))

# ARGV: now, bucket seconds, ttl ms. Returns 1 when it closed a half-open breaker, else 0.
_SUCCESS = (
    _NOW
    + _COUNT
    + """
local key = KEYS[1]
local h = redis.call('HMGET', key, 'state', 'fails')
local state = h[1]
if state == 'open' then return 0 end
if state == 'half_open' then
  redis.call('DEL', key)
  return 1
end
count(key, now_(), 0)
if h[2] and h[2] ~= '0' then redis.call('HSET', key, 'fails', 0) end
redis.call('PEXPIRE', key, ARGV[3])
return 0
"""
)

# ARGV: now, bucket seconds, ttl ms, failures to open, error rate or '', min calls.
# Returns {0 no change | 1 opened | 2 the probe failed, open again, fails, failed, calls}.
_FAILURE = (
    _NOW
    + _COUNT
    + """
local key = KEYS[1]
local h = redis.call('HMGET', key, 'state', 'fails')
local state = h[1]
local fails = (tonumber(h[2]) or 0)
if state == 'open' then return {0, fails, 0, 0} end
fails = fails + 1
local now = now_()
if state == 'half_open' then
  redis.call('HSET', key, 'state', 'open', 'opened_at', num(now), 'probe_until', 0, 'fails', fails)
  redis.call('PEXPIRE', key, ARGV[3])
  return {2, fails, 0, 0}
end
local calls, bad = count(key, now, 1)
redis.call('HSET', key, 'fails', fails)
local code = 0
local rate = tonumber(ARGV[5])
if fails >= tonumber(ARGV[4])
   or (rate and calls >= tonumber(ARGV[6]) and bad >= rate * calls) then
  redis.call('HSET', key, 'state', 'open', 'opened_at', num(now), 'probe_until', 0)
  code = 1
end
redis.call('PEXPIRE', key, ARGV[3])
return {code, fails, bad, calls}
"""
)


class RedisBreakers:
    """The ``Breakers`` protocol on a Redis shared by all proxy processes."""

    def __init__(
        self,
        client: Redis,
        prefix: str = "robota",
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] | None = None,
        on_change: OnChange | None = None,
        warn_interval: float = 10.0,
        timeout: float = 0.5,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._redis = client
        self._prefix = f"{prefix}:breaker:"
        self._clock = clock
        self._on_change = on_change
        self._warn = ThrottledLog(log, warn_interval)
        self._timeout = timeout
        p = self.policy
        self._ttl_ms = str(
            max(1, round((p.window_seconds + p.cooldown_seconds + p.probe_timeout_seconds) * 1000))
        )
        self._allow = client.register_script(_ALLOW)
        self._success = client.register_script(_SUCCESS)
        self._failure = client.register_script(_FAILURE)
        #: Targets this process has asked about: what ``snapshot`` reports.
        self._seen: set[str] = set()

    def key(self, target: str) -> str:
        return f"{self._prefix}{target}:state"

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    async def _call(self, operation: Awaitable[Any]) -> Any:
        """One round trip, given up after ``timeout``: a breaker sits before every attempt,
        and a Redis that hangs, or a client that retries a refused connection with back-off
        (redis-py's default), must not hold every request for seconds."""
        with anyio.fail_after(self._timeout):
            return await operation

    def _unreachable(self, exc: Exception) -> None:
        # The type only: the text of a connection error may carry the URL and its password.
        self._warn.warn(
            _PART,
            "shared state unreachable for %s (%s): every target is let through meanwhile",
            _PART,
            type(exc).__name__,
        )

    async def allow(self, target: str) -> bool:
        self._seen.add(target)
        p = self.policy
        args: list[str | float] = [
            self._now(),
            p.cooldown_seconds,
            p.probe_timeout_seconds,
            self._ttl_ms,
        ]
        try:
            code, fails = await self._call(self._allow(keys=[self.key(target)], args=args))
        except Exception as exc:
            self._unreachable(exc)
            return True
        if code == 2:
            announce(self._on_change, target, "half_open", int(fails))
        return bool(code)

    async def success(self, target: str) -> None:
        self._seen.add(target)
        args: list[str | float] = [self._now(), self.policy.bucket_seconds, self._ttl_ms]
        try:
            closed = await self._call(self._success(keys=[self.key(target)], args=args))
        except Exception as exc:
            self._unreachable(exc)
            return
        if closed:
            announce(self._on_change, target, "closed", 0)

    async def failure(self, target: str) -> None:
        self._seen.add(target)
        p = self.policy
        rate = "" if p.error_rate is None else repr(p.error_rate)
        args: list[str | float] = [
            self._now(),
            p.bucket_seconds,
            self._ttl_ms,
            p.failures,
            rate,
            p.min_calls,
        ]
        try:
            code, fails, failed, calls = await self._call(
                self._failure(keys=[self.key(target)], args=args)
            )
        except Exception as exc:
            self._unreachable(exc)
            return
        if code:
            announce(self._on_change, target, "open", int(fails), int(failed), int(calls))

    async def snapshot(self) -> dict[str, BreakerState]:
        """The shared state of every target this process has used; empty while Redis cannot be
        reached (unknown rather than a guess)."""
        targets = sorted(self._seen)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for target in targets:
                    pipe.hget(self.key(target), "state")
                values = await self._call(pipe.execute())
        except Exception as exc:
            self._unreachable(exc)
            return {}
        return {target: _state(value) for target, value in zip(targets, values, strict=True)}


def _state(value: bytes | str | None) -> BreakerState:
    text = value.decode() if isinstance(value, bytes) else value
    if text == "open":
        return "open"
    if text == "half_open":
        return "half_open"
    return "closed"
