"""Abuse limits: how many associations at once (in all, per listener, per source, per calling AE)
and how fast one source may open connections. Pure: the clock is injected, nothing else is read.

Two moments, two checks:

* connection accepted  -> LimitTracker.admit(source)  token bucket per source: `rate` connections
  per second on average, `burst` at once. Cheap, before a byte of DICOM is read.
* A-ASSOCIATE-RQ read  -> LimitTracker.try_acquire(listener, source, calling_ae)  the counts; on
  success the association holds one slot of each until release() with the same arguments.

A refusal is a bounded LimitReason label (for the metric) and, on the wire, the relay's
A-ASSOCIATE-RJ 2/3/2: transient, service provider (presentation), local limit exceeded.

Memory stays bounded whatever the peers do: counts exist only for held slots (so at most one
entry per live association), and the token buckets keep at most `max_tracked_sources` entries;
a bucket that has refilled completely carries no information and is dropped first, then the
longest idle one. IPv6 sources are counted per /64 (`ipv6_prefix`), since one host usually owns
a whole /64 and could otherwise dodge a per-address limit.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "DEFAULT_MAX_TRACKED_SOURCES",
    "LIMIT_REASONS",
    "LimitReason",
    "LimitTracker",
    "Limits",
    "source_key",
]

DEFAULT_MAX_TRACKED_SOURCES = 10_000
"""Token buckets kept at most (about 100 bytes each). Past this, idle sources are forgotten."""
_EPSILON = 1e-9
"""Float slack, so that n steps of 1/n second add up to the one token they should."""
SWEEP_PER_CALL = 4
"""Idle buckets examined (and dropped when full) per admit(), so memory is returned steadily."""


class LimitReason(StrEnum):
    """Which limit refused an association: the `reason` label of the refusal metric."""

    GLOBAL = "global"
    LISTENER = "listener"
    SOURCE = "source"
    CALLING_AE = "calling_ae"
    RATE = "rate"


LIMIT_REASONS: tuple[str, ...] = tuple(reason.value for reason in LimitReason)
"""Every label value, to initialise the metric at start."""


@dataclass(frozen=True)
class Limits:
    """`limits:` in proxy.yaml. None = no limit of that kind (the default for all of them)."""

    max_associations: int | None = None  # associations at once, all listeners together
    per_listener: int | None = None  # at once, on each listener
    per_source: int | None = None  # at once, from one source address (an IPv6 /64)
    per_calling_ae: int | None = None  # at once, with one calling AE title
    rate: float | None = None  # new connections per second from one source, on average ...
    burst: int | None = None  # ... and at once (bucket size); default max(1, rate) rounded up
    max_associate_rq_size: int | None = None  # bytes; the framer's cap on an A-ASSOCIATE-RQ
    ipv6_prefix: int = 64  # IPv6 sources are counted per prefix of this length
    max_tracked_sources: int = DEFAULT_MAX_TRACKED_SOURCES

    @property
    def bucket_size(self) -> float:
        if self.burst is not None:
            return float(self.burst)
        if self.rate is None:
            return 0.0
        return float(max(1, math.ceil(self.rate)))

    @property
    def any_count(self) -> bool:
        return any(v is not None for v in (self.max_associations, self.per_listener, self.per_source,
                                           self.per_calling_ae))

    def associate_cap(self, configured: int) -> int:
        """The A-ASSOCIATE-RQ size cap to give the framer: the smaller of the top-level
        `max_associate_length` and `limits.max_associate_rq_size`."""
        if self.max_associate_rq_size is None:
            return configured
        return min(configured, self.max_associate_rq_size)


def source_key(source_ip: str, ipv6_prefix: int = 64) -> str:
    """What a per-source limit counts: the IPv4 address, or the IPv6 /ipv6_prefix network.
    IPv4-mapped IPv6 addresses count as IPv4; text that is no address counts as itself."""
    try:
        address = ipaddress.ip_address(source_ip.split("%", 1)[0])
    except ValueError:
        return source_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class LimitTracker:
    """Counts held association slots and per-source token buckets under one Limits.

    Not thread-safe; meant for the event loop. `clock` returns seconds (time.monotonic).
    """

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self.total = 0
        self._listeners: dict[str, int] = {}
        self._sources: dict[str, int] = {}
        self._aes: dict[str, int] = {}
        # (listener, source_ip, calling_ae) as passed -> the source keys taken for it, so release()
        # undoes exactly what try_acquire() did even if a reload changed `ipv6_prefix` in between
        self._holds: dict[tuple[str, str, str], list[str]] = {}
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    # ---- configuration --------------------------------------------------------------------
    def reconfigure(self, limits: Limits) -> None:
        """New limits (a reload). Held slots stay held: associations over a lowered limit are
        not cut, new ones wait until enough are released. Buckets keep their tokens (capped)."""
        self.limits = limits
        if limits.rate is None:
            self._buckets.clear()
            return
        size = limits.bucket_size
        for bucket in self._buckets.values():
            bucket.tokens = min(bucket.tokens, size)
        self._shrink(limits.max_tracked_sources)

    # ---- at accept: the rate ------------------------------------------------------------------
    def admit(self, source_ip: str) -> LimitReason | None:
        """A new connection from `source_ip`: None if the source may connect, else RATE."""
        limits = self.limits
        rate = limits.rate
        if rate is None:
            return None
        now = self._clock()
        size = limits.bucket_size
        key = source_key(source_ip, limits.ipv6_prefix)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(size, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(size, bucket.tokens + elapsed * rate)
            bucket.stamp = now
        self._sweep(now)
        self._shrink(limits.max_tracked_sources)
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return None
        return LimitReason.RATE

    def _sweep(self, now: float) -> None:
        """Drop a few of the longest-idle buckets that have refilled completely."""
        rate = self.limits.rate
        if not rate:
            return
        size = self.limits.bucket_size
        for _ in range(SWEEP_PER_CALL):
            if len(self._buckets) <= 1:
                return
            key, bucket = next(iter(self._buckets.items()))
            if bucket.tokens + (now - bucket.stamp) * rate < size:
                return  # the idlest is still refilling, so are all the others
            del self._buckets[key]

    def _shrink(self, cap: int) -> None:
        while len(self._buckets) > max(1, cap):
            self._buckets.popitem(last=False)  # the longest idle

    @property
    def tracked_sources(self) -> int:
        """Token buckets held now (for a gauge and the bounded-memory test)."""
        return len(self._buckets)

    # ---- at A-ASSOCIATE-RQ: the counts -----------------------------------------------------
    def try_acquire(self, listener: str, source_ip: str, calling_ae: str) -> LimitReason | None:
        """Take one slot of every count, or none: None when all had room, else the first limit
        that is full, checked in the order global, listener, source, calling AE."""
        limits = self.limits
        source = source_key(source_ip, limits.ipv6_prefix)
        ae = calling_ae.strip(" ")
        if limits.max_associations is not None and self.total >= limits.max_associations:
            return LimitReason.GLOBAL
        if limits.per_listener is not None and self._listeners.get(listener, 0) >= limits.per_listener:
            return LimitReason.LISTENER
        if limits.per_source is not None and self._sources.get(source, 0) >= limits.per_source:
            return LimitReason.SOURCE
        if limits.per_calling_ae is not None and self._aes.get(ae, 0) >= limits.per_calling_ae:
            return LimitReason.CALLING_AE
        self.total += 1
        self._listeners[listener] = self._listeners.get(listener, 0) + 1
        self._sources[source] = self._sources.get(source, 0) + 1
        self._aes[ae] = self._aes.get(ae, 0) + 1
        self._holds.setdefault((listener, source_ip, calling_ae), []).append(source)
        return None

    def release(self, listener: str, source_ip: str, calling_ae: str) -> bool:
        """Give back the slots of one try_acquire() that returned None, with the same arguments
        (call it exactly once, when the association is over). False if nothing was held."""
        taken = self._holds.get((listener, source_ip, calling_ae))
        if not taken:
            return False
        source = taken.pop()
        if not taken:
            del self._holds[(listener, source_ip, calling_ae)]
        self.total -= 1
        for key, table in ((listener, self._listeners), (source, self._sources),
                           (calling_ae.strip(" "), self._aes)):
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]
        return True

    def held(self, *, listener: str | None = None, source_ip: str | None = None,
             calling_ae: str | None = None) -> int:
        """Slots held now: in all, or for one listener, source or calling AE (gauges, tests)."""
        if listener is not None:
            return self._listeners.get(listener, 0)
        if source_ip is not None:
            return self._sources.get(source_key(source_ip, self.limits.ipv6_prefix), 0)
        if calling_ae is not None:
            return self._aes.get(calling_ae.strip(" "), 0)
        return self.total
