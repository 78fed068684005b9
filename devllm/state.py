"""The in-process state of one development LLM: counters for ``/_stats``.

Everything here is per process and zeroed by ``POST /_reset``, including the
per-model-string failure counts behind ``times=N``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Literal

LAST_REQUESTS = 50

Outcome = Literal["completed", "cancelled", "faulted"]


class State:
    """Counters of requests and streams, and the last request bodies received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._last_requests: deque[Any] = deque(maxlen=LAST_REQUESTS)
        self._failures: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters; ``active_streams`` is a gauge and keeps counting the open streams,
        and ``peak_active_streams`` starts again from it."""
        with self._lock:
            active = self._counters.get("active_streams", 0)
            self._counters = {
                "requests": 0,
                "errors": 0,
                "requests_cancelled": 0,
                "streams_started": 0,
                "streams_completed": 0,
                "streams_cancelled": 0,
                "streams_faulted": 0,
                "active_streams": active,
                "peak_active_streams": active,
            }
            self._last_requests.clear()
            self._failures.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counters, "last_requests": list(self._last_requests)}

    def request_received(self, body: Any) -> None:
        with self._lock:
            self._counters["requests"] += 1
            self._last_requests.append(body)

    def count(self, counter: str) -> None:
        """Add one to ``errors`` or ``requests_cancelled``."""
        with self._lock:
            self._counters[counter] += 1

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

    def take_failure(self, model: str, times: int | None) -> bool:
        """Whether this request with ``model`` fails: always without ``times``, else the first N."""
        if times is None:
            return True
        with self._lock:
            done = self._failures.get(model, 0)
            if done >= times:
                return False
            self._failures[model] = done + 1
            return True
