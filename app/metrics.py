"""The Prometheus metrics of one process, and how they leave it.

Every process (a worker, each child of a prefork pool, each web process)
records into prometheus_client metric objects of a private
``CollectorRegistry``: an increment is a lock and an addition, in the
process. An answer keeps its own figures (messages, tokens, times) and adds
them once, when it ends, not per message.

Every ``METRICS_INTERVAL`` seconds a :class:`Reporter` thread (a greenlet
under gevent) publishes a snapshot of the registry's cumulative samples, as
JSON, on the fanout exchange ``<ns>.metrics``, on a connection of its own,
never on the streaming path; and one last snapshot when the process stops.
No broker message per request or per token. The web front sums the
snapshots of every process into one scrape endpoint (:mod:`app.totals`,
:mod:`web.metrics`). A snapshot names its process by host, pid and a start
id, so a restarted process is a new one and the totals of the old one stay.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from kombu import Connection, Exchange, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from app.broker import BROKER_ERRORS
from app.process import per_process
from app.protocol import ResponseStream
from config import Settings

logger = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
# Seconds for the first token: chatqueue's own share is milliseconds, the LLM's up to a minute.
ADDED_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The tenants with the most waiting requests that get a series of their own.
TOP_TENANTS = 10
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Error codes come from the LLM's own error objects too: keep the label short.
MAX_CODE = 64
# A snapshot that cannot go out waits for the next one; at shutdown, not long.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


def metrics_exchange(settings: Settings) -> Exchange:
    """Fanout exchange of the snapshots; nobody need listen for it to be valid."""
    return Exchange(
        f"{settings.chatqueue_namespace}.metrics", "fanout", durable=False, auto_delete=False
    )


class Recorder:
    """The metric objects of one process (docs/operations.md and docs/capacity.md list them)."""

    def __init__(self) -> None:
        self.process = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.accepted = Counter(
            "chatqueue_requests_accepted",
            "requests the intake handed off to a task",
            registry=registry,
        )
        self.requests = Counter(
            "chatqueue_requests",
            "requests by outcome (answered, error, dead_lettered, cancelled) and error code "
            "(the dead-letter reason for dead_lettered)",
            ["outcome", "code"],
            registry=registry,
        )
        self.restarts = Counter(
            "chatqueue_restarts",
            "answers started over (redelivered: a worker died; llm_retry: the LLM broke its "
            "stream before the first token; carried_on: written again from memory after a "
            "lost connection, the LLM not asked again)",
            ["reason"],
            registry=registry,
        )
        self.ttft = Histogram(
            "chatqueue_ttft_seconds",
            "from the hand-off of a request to its first response message",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.ttft_added = Histogram(
            "chatqueue_ttft_added_seconds",
            "time to first message added by chatqueue: chatqueue_ttft_seconds less the LLM's "
            "own time to its first payload",
            buckets=ADDED_BUCKETS,
            registry=registry,
        )
        self.llm_ttft = Histogram(
            "chatqueue_llm_ttft_seconds",
            "from the call to the LLM to its first payload (retries included)",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.stream_duration = Histogram(
            "chatqueue_stream_duration_seconds",
            "from the start of an answer to its end ([DONE] or a cancel)",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.messages = Counter(
            "chatqueue_messages",
            "response messages published (chunks, completions, errors, [DONE])",
            registry=registry,
        )
        self.tokens = Counter(
            "chatqueue_tokens",
            "streamed chunks that carry content (one token each from most LLM servers)",
            registry=registry,
        )
        self.streams = Gauge(
            "chatqueue_streams_in_flight", "answers being streamed by workers", registry=registry
        )
        self.llm_responses = Counter(
            "chatqueue_llm_responses",
            "HTTP responses of the LLM by status, retried ones included",
            ["status"],
            registry=registry,
        )
        self.llm_retries = Counter(
            "chatqueue_llm_retries",
            "LLM calls made again (sdk: the openai SDK's retries; stream: a stream broken "
            "before its first token)",
            ["kind"],
            registry=registry,
        )
        self.web_requests = Counter(
            "chatqueue_web_requests",
            "HTTP requests of the web front by route and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.web_streams = Gauge(
            "chatqueue_web_streams_in_flight",
            "answers being read by web clients (SSE, drop-in, WebSocket)",
            registry=registry,
        )
        # Capacity and waiting (app/dispatcher.py): the gauges are the
        # dispatcher's, so only the one worker that dispatches has them.
        self.in_flight = Gauge(
            "chatqueue_upstream_in_flight",
            "LLM calls of an upstream under way (slots taken), over the whole deployment",
            ["upstream"],
            registry=registry,
        )
        self.limit = Gauge(
            "chatqueue_upstream_limit",
            "max_in_flight of an upstream (0: no limit)",
            ["upstream"],
            registry=registry,
        )
        self.waiting = Gauge(
            "chatqueue_waiting",
            "requests waiting for a slot, by upstream and service tier",
            ["upstream", "tier"],
            registry=registry,
        )
        self.waiting_tenants = Gauge(
            "chatqueue_waiting_by_tenant",
            f"requests waiting for a slot, for the {TOP_TENANTS} tenants with the most "
            '(the others summed as tenant="other")',
            ["tenant"],
            registry=registry,
        )
        self.starts = Counter(
            "chatqueue_starts",
            "LLM calls started (slots taken), by upstream and service tier",
            ["upstream", "tier"],
            registry=registry,
        )
        self.wait = Histogram(
            "chatqueue_wait_seconds",
            "from the acceptance of a request to the start of its LLM call",
            ["upstream"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.queue_ended = Counter(
            "chatqueue_waiting_ended",
            "waiting requests that ended without an LLM call (queue_timeout, cancelled)",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.pauses = Counter(
            "chatqueue_upstream_pauses",
            "pauses of an upstream that answered 429, or 503 with retry-after",
            ["upstream"],
            registry=registry,
        )
        self.pause_seconds = Counter(
            "chatqueue_upstream_pause_seconds",
            "seconds of those pauses",
            ["upstream"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "chatqueue_upstream_fallbacks",
            "requests sent to wait for a fallback upstream, from the one that failed them",
            ["upstream", "to"],
            registry=registry,
        )
        # Series that exist from the start, at 0 (Prometheus' advice: a series
        # that appears only with its first event hides that first increase).
        for outcome in ("answered", "cancelled"):
            self.requests.labels(outcome, "")
        for kind in ("sdk", "stream"):
            self.llm_retries.labels(kind)
        for reason in ("redelivered", "llm_retry", "carried_on"):
            self.restarts.labels(reason)

    def snapshot(self, role: str, interval: float, *, final: bool = False) -> dict[str, Any]:
        """The cumulative samples of this process (``_created`` samples left out)."""
        families = [
            {
                "name": metric.name,
                "type": metric.type,
                "help": metric.documentation,
                "samples": [
                    [s.name, s.labels, s.value]
                    for s in metric.samples
                    if not s.name.endswith("_created")
                ],
            }
            for metric in self.registry.collect()
        ]
        return {
            "v": SNAPSHOT_VERSION,
            "process": self.process,
            "role": role,
            "interval": interval,
            "final": final,
            "families": families,
        }


_recorder = per_process(Recorder)


def recorder() -> Recorder:
    """This process's metrics."""
    return _recorder()


# --- what the code records ---------------------------------------------------------------------


def accepted() -> None:
    recorder().accepted.inc()


def dead_lettered(code: str) -> None:
    recorder().requests.labels("dead_lettered", code[:MAX_CODE]).inc()


def restarted(reason: str) -> None:
    recorder().restarts.labels(reason).inc()


def started(upstream: str, tier: str, waited: float) -> None:
    """An LLM call took a slot after ``waited`` seconds."""
    r = recorder()
    r.starts.labels(upstream, tier).inc()
    r.wait.labels(upstream).observe(max(0.0, waited))


def ended_waiting(outcome: str, upstream: str) -> None:
    recorder().queue_ended.labels(upstream, outcome).inc()


def paused(upstream: str, seconds: float) -> None:
    r = recorder()
    r.pauses.labels(upstream).inc()
    r.pause_seconds.labels(upstream).inc(seconds)


def fell_back(upstream: str, to: str) -> None:
    recorder().fallbacks.labels(upstream, to).inc()


def capacity(
    upstreams: dict[str, tuple[int, int, dict[str, int], dict[str, int]]],
) -> None:
    """The dispatcher's view: by upstream (in flight, limit, waiting by tier,
    waiting by tenant); an empty dict clears it (this process no longer dispatches)."""
    r = recorder()
    for gauge in (r.in_flight, r.limit, r.waiting, r.waiting_tenants):
        gauge.clear()
    tenants: dict[str, int] = {}
    for name, (in_flight, limit, by_tier, by_tenant) in upstreams.items():
        r.in_flight.labels(name).set(in_flight)
        r.limit.labels(name).set(limit)
        for tier, count in by_tier.items():
            r.waiting.labels(name, tier).set(count)
        for tenant, count in by_tenant.items():
            tenants[tenant] = tenants.get(tenant, 0) + count
    ranked = sorted(tenants.items(), key=lambda item: -item[1])
    for tenant, count in ranked[:TOP_TENANTS]:
        r.waiting_tenants.labels(tenant[:MAX_CODE]).set(count)
    if len(ranked) > TOP_TENANTS:
        r.waiting_tenants.labels("other").set(sum(c for _, c in ranked[TOP_TENANTS:]))


def retried_stream(*, restarts: bool) -> None:
    """The LLM is asked again; ``restarts``: the answer had begun, and starts over."""
    rec = recorder()
    rec.llm_retries.labels("stream").inc()
    if restarts:
        rec.restarts.labels("llm_retry").inc()


def on_llm_request(request: Any) -> None:
    """httpx event hook: the openai SDK numbers its tries in a header."""
    if request.headers.get("x-stainless-retry-count", "0") != "0":
        recorder().llm_retries.labels("sdk").inc()


def on_llm_response(response: Any) -> None:
    """httpx event hook: every response of the LLM, by status."""
    recorder().llm_responses.labels(str(response.status_code)).inc()


class Answering:
    """The figures of one answer, added to this process's metrics when it ends.

    ``handed_off`` is the wall-clock time of the hand-off (0 when unknown or
    when the answer is a restart, whose hand-off was long ago): the first
    message's delay is measured from it, across hosts, so it needs their
    clocks in step (NTP).
    """

    __slots__ = ("handed_off", "llm_first", "started", "started_wall", "tokens")

    def __init__(self, handed_off: float) -> None:
        recorder().streams.inc()
        self.handed_off = handed_off
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.llm_first: float | None = None  # the LLM's first payload arrived
        self.tokens = 0

    def end(self, outcome: str, stream: ResponseStream) -> None:
        """``outcome``: answered, error (the code of the stream's error object),
        cancelled, or empty (the request goes back to the queue)."""
        rec = recorder()
        rec.streams.dec()
        if outcome:
            code = stream.error_code if outcome == "error" else ""
            rec.requests.labels(outcome, code[:MAX_CODE]).inc()
        rec.messages.inc(stream.sent)
        first_sent = stream.first_sent
        rec.tokens.inc(self.tokens)
        rec.stream_duration.observe(time.monotonic() - self.started)
        if self.llm_first is not None:
            llm = self.llm_first - self.started
            rec.llm_ttft.observe(llm)
            if first_sent is not None and self.handed_off > 0:
                ttft = max(0.0, self.started_wall - self.handed_off) + first_sent - self.started
                rec.ttft.observe(ttft)
                rec.ttft_added.observe(max(0.0, ttft - llm))


# --- how the numbers leave the process ---------------------------------------------------------


class Reporter:
    """Publishes this process's snapshot every ``METRICS_INTERVAL`` seconds."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.role = role
        self.interval = settings.metrics_interval
        self.exchange = metrics_exchange(settings)
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._failing = False

    def start(self) -> None:
        threading.Thread(target=self._run, name="chatqueue-metrics", daemon=True).start()

    def _run(self) -> None:
        self.send()  # at once: a new process counts before its first interval is out
        while not self._stopped.wait(self.interval):
            self.send()

    def send(self, *, final: bool = False) -> None:
        body = json.dumps(recorder().snapshot(self.role, self.interval, final=final))
        with self._lock:
            try:
                if self._producer is None:
                    self._producer = Producer(self.connection)
                self._producer.publish(
                    body,
                    exchange=self.exchange,
                    routing_key="",
                    declare=[self.exchange],
                    content_type="application/json",
                    content_encoding="utf-8",
                    retry=True,
                    retry_policy=RETRY_POLICY,
                )
            except BROKER_ERRORS as exc:
                if not self._failing:  # one line per outage, not one per interval
                    logger.warning("metrics: cannot publish a snapshot (%r)", exc)
                self._failing = True
                return
            if self._failing:
                logger.info("metrics: snapshots go out again")
            self._failing = False

    def stop(self) -> None:
        """The last snapshot (``final``: its process is gone, its gauges with it)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.send(final=True)
        self.connection.release()


class _Reporting:
    """This process's :class:`Reporter`, if it reports (none in a child until it starts one)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self.reporter: Reporter | None = None


_reporting = _Reporting()


def report(settings: Settings, role: str) -> Reporter:
    """Start this process's :class:`Reporter` (once per process)."""
    with _reporting.lock:
        if _reporting.reporter is None:
            _reporting.reporter = Reporter(settings, role)
            _reporting.reporter.start()
        return _reporting.reporter


def stop_reporting() -> None:
    """Send this process's last snapshot, if it reports."""
    with _reporting.lock:
        found, _reporting.reporter = _reporting.reporter, None
    if found is not None:
        found.stop()
