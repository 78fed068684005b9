"""Builds the Celery app of ``celery -A app``."""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

from celery import Celery, signals
from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from celery.worker.request import logger as request_logger

from app import logs
from app.broker import Pools
from app.shutdown import RoomForCopies, TaskLinkStep, task_link, warm_shutdown
from app.tasknames import STREAM_CHAT
from config import Settings, load_settings
from config.celery import celery_config


class TaskConsumer(Consumer):  # type: ignore[misc]
    """Celery's task consumer without native delayed delivery.

    With a quorum task queue Celery adds a step that declares 28 exchanges
    and queues for ETA and countdown tasks on every node of
    ``RABBITMQ_URL``, each time its consumer (re)connects, and tries a node
    that is down three times, 1 + 3 + 5 s apart: after a node died, a
    worker took its next task 17 s after reconnecting (tests/test_cluster.py).
    chatqueue sends no ETA or countdown task; its retries wait inside the task.
    """

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            step
            for step in Consumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]


class SlotRequest(Request):  # type: ignore[misc]
    """A task message that ends gives its slot back (app/dispatcher.py).

    Where Celery acknowledges a task message, this rejects it without
    requeue instead: ``<ns>.running`` dead-letters it to ``<ns>.slots``, where
    the dispatcher takes it as a free slot. One broker operation ends the
    task and frees its slot. Messages given back (``Reject(requeue=True)``,
    a worker that dies) stay on ``<ns>.running``, in their slot.
    """

    acknowledged: bool

    def acknowledge(self) -> None:
        if not self.acknowledged:
            # Celery's own logger: a reject that fails with its lost
            # connection is one line, as for Celery's acks (app/logs.py).
            self._on_reject(request_logger, self._connection_errors, False)
            self.acknowledged = True


class ChatqueueCelery(Celery):  # type: ignore[misc]
    """The Celery app, with the settings and the publishing pools of its process."""

    settings: Settings
    pools: Pools


def create_app(settings: Settings | None = None) -> ChatqueueCelery:
    from app.consumer import RequestConsumer
    from app.events import BufferedTaskEvents
    from tasks.chat import stream_chat

    settings = settings or load_settings()
    app = ChatqueueCelery("chatqueue", set_as_current=False)
    app.settings = settings
    app.pools = Pools(settings)
    app.config_from_object(celery_config(settings))
    task = app.task(
        name=STREAM_CHAT,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        Request=SlotRequest,
    )(stream_chat)
    app.steps["worker"].add(RequestConsumer)
    app.steps["worker"].add(RoomForCopies)
    app.steps["consumer"].add(BufferedTaskEvents)
    app.steps["consumer"].add(TaskLinkStep)
    signals.task_received.connect(_note_connection, weak=False)
    logs.install()

    level = logging.getLevelName(settings.log_level.upper())

    def set_level(logger: logging.Logger, **_: Any) -> None:
        logger.setLevel(level)
        # One line per HTTP request to the LLM is noise at info level.
        for name in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(name).setLevel(max(level, logging.WARNING))

    def warm_up(**_: Any) -> None:
        """Make the process's LLM client and cancel listener before the first task,
        and start reporting its metrics."""
        from app import metrics
        from tasks import cancel, llm

        llm.client(settings)
        cancel.listener(settings)
        metrics.report(settings, "worker")
        logs.quiet_hub()
        # Celery keeps its (disabled) result backend per thread, so per greenlet:
        # without this, every apply_async of a request built a new one.
        task.backend = app.backend

    def last_report(**_: Any) -> None:
        from app import metrics

        metrics.stop_reporting()

    def on_shutting_down(how: str = "", **_: Any) -> None:
        """SIGTERM: the grace of the streams in flight starts now (app/shutdown.py).
        A cold shutdown (SIGQUIT) is Celery's: it cancels them at once."""
        if how == "Warm":
            warm_shutdown.begin(settings.worker_shutdown_grace)

    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    signals.worker_process_init.connect(warm_up, weak=False)
    signals.worker_process_shutdown.connect(last_report, weak=False)
    signals.worker_shutdown.connect(last_report, weak=False)
    signals.worker_ready.connect(warm_up, weak=False)
    signals.worker_ready.connect(_quiet_cancel_warning, weak=False)
    signals.after_setup_logger.connect(set_level, weak=False)
    signals.after_setup_task_logger.connect(set_level, weak=False)
    return app


def _note_connection(request: Any = None, **_: Any) -> None:
    if request is not None:
        task_link.received(request)


def _quiet_cancel_warning(**_: Any) -> None:
    """Celery warns at each lost connection that Celery 6 will cancel its tasks
    by default: chatqueue sets ``worker_cancel_long_running_tasks_on_connection_loss``
    itself (config/celery.py). Celery's logging set-up, before, makes its
    deprecation warnings ``always`` shown."""
    warnings.filterwarnings(
        "ignore",
        message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
        category=CPendingDeprecationWarning,
    )
