"""What a process counts as it serves, for `GET /metrics` (app/metrics.py): each declared
route's requests by status code and their durations (a histogram), and the runtime API's
outcomes (checks by reason, usage events and measurements by status), which no proxy in front
can see.

Counting costs a few dictionary and list updates per request (`bench/observe.py` measures it
against the same requests uncounted); `CREDITGATE_REQUEST_METRICS=0` turns all of it off.
Durations are integer nanoseconds from `perf_counter_ns`, bucketed against integer bounds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

# the histogram's upper bounds in seconds, as Prometheus prints them (`le`); a cached check
# is served in well under 0.25 ms, a batch of 1,000 events in tens of milliseconds
BUCKETS = ("0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
           "0.25", "0.5", "1", "2.5", "5", "10")
BOUNDS_NS = tuple(int(Decimal(b) * 1_000_000_000) for b in BUCKETS)


class RouteStats:
    """One route's requests: counts by status code, and a duration histogram whose last
    slot counts what is over every bound."""

    __slots__ = ("codes", "slots", "sum_ns")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.slots = [0] * (len(BOUNDS_NS) + 1)
        self.sum_ns = 0

    def observe(self, status: int, elapsed_ns: int, _slot: Callable[..., int] = bisect_left,
                _bounds: tuple[int, ...] = BOUNDS_NS) -> None:
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.slots[_slot(_bounds, elapsed_ns)] += 1
        self.sum_ns += elapsed_ns

    def cumulative(self) -> list[int]:
        """The count at or below each bound, then the count of all (`le="+Inf"`)."""
        out, running = [], 0
        for n in self.slots:
            running += n
            out.append(running)
        return out


@dataclass
class Observed:
    """A process's counts since it started: one per app (tests run several in one process)."""

    routes: dict[tuple[str, str], RouteStats] = field(default_factory=dict)
    checks: Counter[tuple[str, bool]] = field(default_factory=Counter)  # (reason, consume)
    usage: Counter[str] = field(default_factory=Counter)  # accepted, duplicate, rejected
    measurements: Counter[str] = field(default_factory=Counter)  # rated, unrated, ...

    def route(self, method: str, path: str) -> RouteStats:
        """The stats of a route (its template path): shared by the route's two apps, the
        exact-path one ahead of Starlette and Starlette's own."""
        return self.routes.setdefault((method, path), RouteStats())
