"""Celery settings derived from :class:`config.Settings`."""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from config.settings import Settings


def running_arguments(settings: Settings) -> dict[str, Any]:
    """``<ns>.running`` dead-letters the task messages that end to ``<ns>.slots``."""
    arguments: dict[str, Any] = {
        **settings.queue_arguments,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.slots_queue,
    }
    if settings.rabbitmq_queue_type == "quorum":
        # A quorum queue dead-letters at most once unless told otherwise; at
        # least once needs reject-publish. A slot that comes back twice is
        # dropped by its number.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def celery_config(settings: Settings) -> dict[str, Any]:
    # The task messages of the calls that run: each ends dead-lettered to the
    # free slots (app/dispatcher.py), so every declare carries those arguments.
    tasks = Queue(
        settings.task_queue,
        Exchange(""),
        settings.task_queue,
        durable=True,
        queue_arguments=running_arguments(settings),
    )
    return {
        # A ';'-separated list is Celery's failover list: its connections try
        # the nodes in turn, and move on when theirs goes away.
        "broker_url": settings.rabbitmq_url,
        **quorum_config(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_pool_limit": settings.publish_pool_size,
        # With AMQP heartbeats on, Celery's green loop drains the event
        # connection for up to 100 ms on every cycle, which delays each task
        # by as much. Dead connections are still found by py-amqp's TCP
        # keepalive and TCP_USER_TIMEOUT socket options.
        "broker_heartbeat": 0,
        "task_queues": [tasks],
        "task_default_queue": settings.task_queue,
        "task_default_exchange": "",
        "task_default_routing_key": settings.task_queue,
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        # At-least-once: a task message is acknowledged when its answer is
        # out, and given back to the broker when its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Off: a stream whose task message went with a lost connection goes
        # on when the message comes back to this process (tasks/chat.py,
        # "carry on"), and stops by itself otherwise. Celery's cancel killed
        # it wherever it was (gevent.kill).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Off: after a reconnect Celery would lower the prefetch count and
        # raise it again from the ack callback of each task that ends
        # (basic.qos, which waits for its answer), in the task's greenlet,
        # while the consumer's loop reads the same socket: gevent refuses
        # the second reader (ConcurrentObjectUseError). The
        # tasks of the lost connection end or go on beside the new ones in
        # a pool with room for both (app.shutdown.RoomForCopies).
        "worker_enable_prefetch_count_reduction": False,
        "worker_prefetch_multiplier": 1,
        # Flower: events from the worker, and task-sent from the consumer.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # Celery's consumer without native delayed delivery (app/factory.py).
        "worker_consumer": "app.factory:TaskConsumer",
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
    }


def quorum_config(settings: Settings) -> dict[str, Any]:
    """What Celery needs for a quorum task queue (RABBITMQ_QUEUE_TYPE=quorum).

    Celery 5.5+ sees the queue's ``x-queue-type`` and then uses a prefetch per
    consumer, not the global QoS quorum queues refuse
    (``worker_detect_quorum_queues``, on by default); Celery's own publishes
    wait for the broker's confirms, as its guide for quorum queues asks.
    ETA and countdown tasks would need native delayed delivery, which Celery
    sets up when it sees a quorum queue; chatqueue sends none (its retries
    wait inside the task) and leaves it out (app.factory.TaskConsumer).
    """
    if settings.rabbitmq_queue_type != "quorum":
        return {}
    return {
        "worker_detect_quorum_queues": True,
        "broker_transport_options": {"confirm_publish": True},
    }
