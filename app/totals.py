"""The sum of every process's metrics: a prometheus_client collector of snapshots.

Each process publishes the cumulative samples of its metrics now and then
(:mod:`app.metrics`); :class:`Totals` keeps the last snapshot of each
process and, when scraped, yields their sums as metric families:

* counters and histograms of a process that is gone (its last snapshot said
  ``final``, or it has been silent for ``STALE_INTERVALS`` intervals) are
  kept, folded into a total of the departed, so sums never go down while
  this collector lives. A process folded for silence that speaks again is
  taken back out of that total (for the last ``REMEMBERED`` such processes);
* gauges (streams in flight) count only the processes alive now.

A collector that starts (a web process that starts) knows the processes
alive then, not those gone before: for Prometheus that is a counter reset,
which ``rate()`` and ``increase()`` take in their stride.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

STALE_INTERVALS = 3
REMEMBERED = 1000

# (sample name, sorted label pairs) -> value
Key = tuple[str, tuple[tuple[str, str], ...]]


class Snapshot:
    """One process's last snapshot, as sums by family."""

    __slots__ = ("final", "interval", "process", "role", "samples", "seen")

    def __init__(self, raw: dict[str, Any], seen: float) -> None:
        self.process = str(raw["process"])
        self.role = str(raw["role"])
        self.interval = float(raw["interval"])
        self.final = bool(raw.get("final"))
        self.seen = seen
        # family name -> (type, help, {key: value})
        self.samples: dict[str, tuple[str, str, dict[Key, float]]] = {}
        for family in raw["families"]:
            values = {
                (str(name), tuple(sorted((str(k), str(v)) for k, v in labels.items()))): float(
                    value
                )
                for name, labels, value in family["samples"]
            }
            self.samples[str(family["name"])] = (str(family["type"]), str(family["help"]), values)


class Totals(Collector):
    """Sums of the snapshots of every process (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, Snapshot] = {}
        self._departed: dict[str, dict[Key, float]] = defaultdict(dict)  # family -> sums
        self._kinds: dict[str, tuple[str, str]] = {}  # family -> (type, help)
        self._folded: OrderedDict[str, Snapshot] = OrderedDict()

    def add(self, raw: dict[str, Any], now: float | None = None) -> None:
        """Take a snapshot (a JSON object from :meth:`app.metrics.Recorder.snapshot`)."""
        snapshot = Snapshot(raw, time.monotonic() if now is None else now)
        with self._lock:
            for name, (kind, doc, _) in snapshot.samples.items():
                self._kinds[name] = (kind, doc)
            folded = self._folded.pop(snapshot.process, None)
            if folded is not None:  # silent for a while, but not gone
                self._fold(folded, sign=-1.0)
            if snapshot.final:
                self._live.pop(snapshot.process, None)
                self._fold(snapshot, sign=1.0)
            else:
                self._live[snapshot.process] = snapshot

    def _fold(self, snapshot: Snapshot, sign: float) -> None:
        for name, (kind, _, values) in snapshot.samples.items():
            if kind == "gauge":
                continue
            sums = self._departed[name]
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + sign * value

    def _expire(self, now: float) -> None:
        for process, snapshot in list(self._live.items()):
            if now - snapshot.seen > STALE_INTERVALS * snapshot.interval:
                del self._live[process]
                self._fold(snapshot, sign=1.0)
                self._folded[process] = snapshot
                while len(self._folded) > REMEMBERED:
                    self._folded.popitem(last=False)

    def processes(self, now: float | None = None) -> dict[str, int]:
        """Processes alive, by role."""
        with self._lock:
            self._expire(time.monotonic() if now is None else now)
            counts: dict[str, int] = defaultdict(int)
            for snapshot in self._live.values():
                counts[snapshot.role] += 1
            return dict(counts)

    def collect(self, now: float | None = None) -> Iterator[Metric]:
        with self._lock:
            self._expire(time.monotonic() if now is None else now)
            sums: dict[str, dict[Key, float]] = {
                name: dict(values) for name, values in self._departed.items()
            }
            roles: dict[str, int] = defaultdict(int)
            for snapshot in self._live.values():
                roles[snapshot.role] += 1
                for name, (_, _, values) in snapshot.samples.items():
                    family = sums.setdefault(name, {})
                    for key, value in values.items():
                        family[key] = family.get(key, 0.0) + value
            kinds = dict(self._kinds)
        for name, (kind, doc) in sorted(kinds.items()):
            metric = Metric(name, doc, kind)
            for (sample, labels), value in sums.get(name, {}).items():  # buckets in order
                metric.add_sample(sample, dict(labels), value)
            yield metric
        processes = Metric(
            "chatqueue_processes", "processes whose metrics are summed here, by role", "gauge"
        )
        for role, count in sorted(roles.items()):
            processes.add_sample("chatqueue_processes", {"role": role}, float(count))
        yield processes
