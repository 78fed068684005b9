"""``GET /metrics``: the Prometheus metrics of the whole deployment, from any web process.

Every process publishes snapshots of its own metrics on ``<ns>.metrics``
(:mod:`app.metrics`); each web process listens there (an exclusive queue of
its own, in a greenlet) and sums them (:class:`app.totals.Totals`), so any
web process, behind any load balancer, answers a scrape with the same
totals. The depths of the input, task and dead-letter queues are read at
scrape time (a passive declare each, kept ``DEPTH_CACHE`` seconds).

This process's own numbers (HTTP requests by route and status, streams being
read) are recorded by the hooks here and in :mod:`web.responses`, and go out
with its snapshots like every other process's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from amqp.exceptions import ChannelError
from flask import Blueprint, Flask, Response, current_app, request
from kombu import Connection, Queue
from kombu.message import Message
from kombu.mixins import ConsumerMixin
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app import metrics
from app.totals import Totals
from config import Settings
from web.router import connect

logger = logging.getLogger(__name__)

EXTENSION = "chatqueue.metrics"
ENDPOINT = "metrics.scrape"
# Seconds a reading of the queue depths is served again.
DEPTH_CACHE = 2.0

bp = Blueprint("metrics", __name__)


class SnapshotListener(ConsumerMixin):
    """Takes every process's snapshots from ``<ns>.metrics`` into :class:`Totals`."""

    def __init__(self, settings: Settings, totals: Totals) -> None:
        self.settings = settings
        self.totals = totals
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        queue = Queue(
            "",
            metrics.metrics_exchange(self.settings),
            exclusive=True,
            auto_delete=True,
            durable=False,
            # A listener that falls behind keeps only recent snapshots.
            queue_arguments={"x-max-length": 10_000},
        )
        return [consumer_cls(queues=[queue], on_message=self.on_message, no_ack=True)]

    def on_message(self, message: Message) -> None:
        try:
            self.totals.add(json.loads(message.body))
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("metrics: a snapshot that cannot be read is ignored: %r", exc)

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("metrics: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)


class QueueDepths(Collector):
    """Messages waiting in chatqueue's queues, and their consumers, read at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.rabbitmq_url
        self.queues = {
            "input": settings.rabbitmq_queue,
            "waiting": settings.waiting_queue,
            "running": settings.task_queue,
            "dead_letter": settings.dead_letter_queue,
        }
        self._lock = threading.Lock()
        self._connection: Any = None
        self._read_at = -DEPTH_CACHE
        self._depths: dict[str, tuple[int, int]] = {}

    def depths(self) -> dict[str, tuple[int, int]]:
        """Queue (by role) -> (messages, consumers); a queue that does not exist is left out."""
        with self._lock:
            if time.monotonic() - self._read_at >= DEPTH_CACHE:
                self._depths = self._read()
                self._read_at = time.monotonic()
            return self._depths

    def _read(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        try:
            if self._connection is None:
                self._connection = connect(self.url)
            channel = self._connection.channel()
            for role, name in self.queues.items():
                try:
                    ok = channel.queue_declare(queue=name, passive=True)
                except ChannelError:  # no such queue (yet): the broker closed the channel
                    channel = self._connection.channel()
                    continue
                found[role] = (ok.message_count, ok.consumer_count)
            channel.close()
        except Exception as exc:  # a scrape never fails for want of the depths
            logger.warning("metrics: cannot read the queue depths (%r)", exc)
            if self._connection is not None:
                self._connection.release()
            self._connection = None
        return found

    def collect(self) -> Iterator[Metric]:
        messages = GaugeMetricFamily(
            "chatqueue_queue_messages",
            "messages ready in chatqueue's queues (input; waiting, beyond what the dispatcher "
            "holds; running; dead_letter)",
            labels=["queue", "name"],
        )
        consumers = GaugeMetricFamily(
            "chatqueue_queue_consumers",
            "consumers of chatqueue's queues (input, waiting, running, dead_letter)",
            labels=["queue", "name"],
        )
        for role, (ready, consuming) in self.depths().items():
            messages.add_metric([role, self.queues[role]], ready)
            consumers.add_metric([role, self.queues[role]], consuming)
        yield messages
        yield consumers


class MetricsFront:
    """What ``/metrics`` of one web process serves: the totals and the queue depths."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.totals = Totals()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.totals)
        self.registry.register(QueueDepths(settings))
        self._listening = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen for snapshots and report this process's own (once)."""
        with self._lock:
            if self._listening:
                return
            self._listening = True
        listener = SnapshotListener(self.settings, self.totals)
        threading.Thread(target=listener.run, name="chatqueue-metrics-in", daemon=True).start()
        metrics.report(self.settings, "web")


def front(app: Flask) -> MetricsFront:
    found: MetricsFront = app.extensions[EXTENSION]
    return found


def init_metrics(app: Flask, settings: Settings) -> None:
    """``/metrics`` and the counting of every HTTP request."""
    app.extensions[EXTENSION] = MetricsFront(settings)
    app.register_blueprint(bp)

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.endpoint or "none"
        metrics.recorder().web_requests.labels(endpoint, str(response.status_code)).inc()
        return response


def public_endpoints(settings: Settings) -> frozenset[str]:
    """``/metrics`` is open unless ``METRICS_REQUIRE_KEY``: it holds counts, never content."""
    return frozenset() if settings.metrics_require_key else frozenset({ENDPOINT})


@bp.get("/metrics")
def scrape() -> Response:
    found = front(current_app)
    found.start()  # normally started by gunicorn's post_worker_init already
    return Response(generate_latest(found.registry), content_type=CONTENT_TYPE_LATEST)


# --- gunicorn's hooks (config/gunicorn.py) -----------------------------------------------------


def on_worker_start(app: Any) -> None:
    """In a new web process: listen and report at once, before the first scrape."""
    if isinstance(app, Flask) and EXTENSION in app.extensions:
        front(app).start()


def on_worker_exit() -> None:
    """The process's last snapshot."""
    metrics.stop_reporting()
