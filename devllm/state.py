"""The in-process state of one development LLM: the counters behind ``/_stats`` and ``/stats``.

Everything here is per process and zeroed by ``POST /_reset`` or
``POST /stats/reset`` (the same reset), including the per-model-string failure
counts behind ``times=N``. The gauges (``active_streams``, ``in_flight``,
``queued``) keep their values across a reset, and the peaks start again from them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Literal

LAST_REQUESTS = 50
RECEIVED_LOG = 10_000

Outcome = Literal["completed", "cancelled", "faulted", "interrupted"]


class State:
    """Counters of requests and streams, the last request bodies and the times of arrival."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._last_requests: deque[Any] = deque(maxlen=LAST_REQUESTS)
        self._received_log: deque[float] = deque(maxlen=RECEIVED_LOG)
        self._failures: dict[str, int] = {}
        self._refused: dict[str, int] = {}
        self._on_demand: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters; the gauges keep their values and the peaks start from them."""
        with self._lock:
            active = self._counters.get("active_streams", 0)
            in_flight = self._counters.get("in_flight", 0)
            queued = self._counters.get("queued", 0)
            self._counters = {
                "requests": 0,
                "errors": 0,
                "requests_cancelled": 0,
                "streams_started": 0,
                "streams_completed": 0,
                "streams_cancelled": 0,
                "streams_faulted": 0,
                "streams_interrupted": 0,
                "active_streams": active,
                "peak_active_streams": active,
                "in_flight": in_flight,
                "max_in_flight": in_flight,
                "queued": queued,
                "served": 0,
                "interrupted": 0,
            }
            self._last_requests.clear()
            self._received_log.clear()
            self._failures.clear()
            self._refused = {"429": 0, "503": 0}
            self._on_demand = {}

    _LEGACY = (
        "requests",
        "errors",
        "requests_cancelled",
        "streams_started",
        "streams_completed",
        "streams_cancelled",
        "streams_faulted",
        "streams_interrupted",
        "active_streams",
        "peak_active_streams",
    )

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /_stats``: stream counters and the last request bodies."""
        with self._lock:
            counters = {key: self._counters[key] for key in self._LEGACY}
            return {**counters, "last_requests": list(self._last_requests)}

    def traffic(self, since: float | None = None) -> dict[str, Any]:
        """The body of ``GET /stats``: load, outcomes, and the times requests arrived.

        ``since`` (a ``time.time()``) keeps only the arrivals at or after it in
        ``received_log``; ``received`` counts them all.
        """
        with self._lock:
            c = self._counters
            log = [t for t in self._received_log if since is None or t >= since]
            return {
                "in_flight": c["in_flight"],
                "max_in_flight": c["max_in_flight"],
                "queued": c["queued"],
                "received": c["requests"],
                "served": c["served"],
                "refused": dict(self._refused),
                "interrupted": c["interrupted"],
                "cancelled": c["requests_cancelled"] + c["streams_cancelled"],
                "on_demand": dict(self._on_demand),
                "received_log": log,
            }

    def request_received(self, body: Any) -> None:
        with self._lock:
            self._counters["requests"] += 1
            self._last_requests.append(body)
            self._received_log.append(time.time())

    def count(self, counter: str) -> None:
        """Add one to ``errors``, ``requests_cancelled``, ``served`` or ``interrupted``."""
        with self._lock:
            self._counters[counter] += 1

    def refused(self, status: int) -> None:
        """A request found every slot busy and was answered ``status`` at once."""
        with self._lock:
            self._refused[str(status)] = self._refused.get(str(status), 0) + 1

    def on_demand(self, status: int) -> None:
        """A request was answered ``status`` because its model string asked for it."""
        with self._lock:
            self._on_demand[str(status)] = self._on_demand.get(str(status), 0) + 1

    def occupancy(self, in_flight: int, queued: int) -> None:
        """The requests holding a slot and those waiting for one, now."""
        with self._lock:
            self._counters["in_flight"] = in_flight
            self._counters["max_in_flight"] = max(self._counters["max_in_flight"], in_flight)
            self._counters["queued"] = queued

    def stream_started(self) -> None:
        with self._lock:
            self._counters["streams_started"] += 1
            self._counters["active_streams"] += 1
            self._counters["peak_active_streams"] = max(
                self._counters["peak_active_streams"], self._counters["active_streams"]
            )

    def stream_finished(self, outcome: Outcome) -> None:
        with self._lock:
            self._counters[f"streams_{outcome}"] += 1
            self._counters["active_streams"] -= 1
            if outcome == "completed":
                self._counters["served"] += 1

    def take_failure(self, model: str, times: int | None, until: float | None = None) -> bool:
        """Whether this request with ``model`` fails.

        Not once ``time.time()`` reaches ``until``; otherwise always without ``times``,
        else the first ``times`` requests with this model string.
        """
        if until is not None and time.time() >= until:
            return False
        if times is None:
            return True
        with self._lock:
            done = self._failures.get(model, 0)
            if done >= times:
                return False
            self._failures[model] = done + 1
            return True
