"""The consumer bootstep: raw JSON from the input queue, handed to the task.

It runs inside the worker's consumer loop, so its callback stays small and
never waits for the LLM: decode, validate, declare the response queue,
``apply_async(task_id=uid)`` with the broker's confirm, then ack. Every
synchronous broker call is made on a pooled publishing connection, never on
the consumer's own (see PITFALLS.md: re-entrant deliveries). Duplicates are
the task's to find (see :mod:`tasks.admission`).

A request that cannot be served is dead-lettered to ``<ns>.dead-letter`` with
the reason in its headers, and, where its uid or ``reply_to`` is known, the
client gets an error object and ``[DONE]``. Nothing escapes the callback.
"""

from __future__ import annotations

import logging
from typing import Any

from amqp.exceptions import PreconditionFailed
from celery import bootsteps
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.transport.pyamqp import Channel

from app.broker import (
    BROKER_ERRORS,
    CLAIM_TOKEN_HEADER,
    RETRY_POLICY,
    dead_letter,
    dead_letter_queue,
    declare_response_queue,
    input_queue,
)
from app.errors import RequestError
from app.protocol import ResponseStream
from app.request import ChatRequest, decode_body, parse_request
from app.tasknames import STREAM_CHAT

logger = logging.getLogger(__name__)


class RequestConsumer(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consumes ``RABBITMQ_QUEUE`` in every worker."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.app = parent.app
        self.green = False

    def start(self, c: Any) -> None:
        # Under the gevent pool each request is accepted in a greenlet of its
        # own (its broker calls wait on pooled connections, not on the
        # consumer's), so a burst is accepted at the broker's pace, not one
        # round trip after another. Celery's gevent pool acks from greenlets too.
        self.green = type(c.pool).__module__ == "celery.concurrency.gevent"
        super().start(c)

    def get_consumers(self, channel: Channel) -> list[Consumer]:
        settings = self.app.settings
        dead_letter_queue(settings)(channel).declare()
        handle = Intake(self.app).on_message
        if self.green:
            from gevent.pool import Pool

            handle = _spawner(Pool(settings.input_prefetch), Intake(self.app).on_message)
        logger.info(
            "consuming requests from %s (prefetch %d%s)",
            settings.rabbitmq_queue,
            settings.input_prefetch,
            ", accepted in parallel greenlets" if self.green else "",
        )
        return [
            Consumer(
                channel,
                queues=[input_queue(settings)],
                on_message=handle,
                prefetch_count=settings.input_prefetch,
            )
        ]


def _spawner(pool: Any, handle: Any) -> Any:
    def spawn(message: Message) -> None:
        pool.spawn(handle, message)

    return spawn


class Intake:
    """Takes one input message at a time: accept it, or reject it with a reason."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = app.settings

    def on_message(self, message: Message) -> None:
        for attempt in (1, 2):
            try:
                uid = self.accept(message)
            except RequestError as exc:
                self.on_bad_request(message, exc)
            except BROKER_ERRORS as exc:
                if attempt == 1:
                    # Most often a pooled connection that died with a broker
                    # restart: try once more on a new one rather than requeue.
                    logger.info("broker error while accepting (%r); trying a new connection", exc)
                    continue
                logger.warning("broker error while accepting a request, requeued: %r", exc)
                self._settle(message, requeue=True)
            except Exception:
                logger.exception("unexpected error while accepting a request; dead-lettering it")
                self.on_bad_request(message, RequestError("internal error", code="internal_error"))
            else:
                self._settle(message, requeue=False)
                logger.info("uid=%s: accepted", uid)
            return

    def accept(self, message: Message) -> str:
        """Hand the request off to the task, confirmed; return its uid."""
        props = message.properties
        data = decode_body(message.body, self.settings.max_body_bytes)
        request = parse_request(
            data,
            default_model=self.settings.openai_model,
            correlation_id=props.get("correlation_id"),
            reply_to=props.get("reply_to"),
        )
        options: dict[str, Any] = {}
        if message.delivery_info.get("redelivered"):
            # An earlier attempt may have handed off and begun the answer.
            options["restart"] = True
        token = (message.headers or {}).get(CLAIM_TOKEN_HEADER)
        if isinstance(token, str) and token:
            options["token"] = token
        task = self.app.tasks[STREAM_CHAT]
        with self.app.pools.confirmed.acquire(block=True) as producer:
            try:
                self._hand_off(producer, task, request, options)
            except BROKER_ERRORS:
                producer.connection.collect()  # dead: the next acquire reconnects
                raise
        logger.debug(
            "uid=%s: model %s, stream %s, user %s",
            request.uid,
            request.model,
            request.stream,
            request.username,
        )
        return request.uid

    def _hand_off(
        self, producer: Any, task: Any, request: ChatRequest, options: dict[str, Any]
    ) -> None:
        def hand_off() -> None:
            task.apply_async(
                args=[request.to_task()],
                kwargs=options or None,
                task_id=request.uid,
                # What Flower and the events show: no prompts (and no repr of
                # a whole conversation for every request), no claim token.
                argsrepr=request.summary(),
                kwargsrepr=repr({k: "***" if k == "token" else v for k, v in options.items()}),
                producer=producer,
                retry=True,
                retry_policy=RETRY_POLICY,
            )

        try:
            if request.reply_to is None:
                # Pipelined: the task's confirm answers for the declare too,
                # and the task starts only once the queue is there.
                declare_response_queue(producer.channel, self.settings, request.uid, nowait=True)
            hand_off()
        except PreconditionFailed:
            # The client declared response_<uid> with other arguments: the
            # broker closed the channel before taking the task; use the
            # queue as it is and hand off again on a fresh channel.
            logger.info("uid=%s: response queue exists with other arguments", request.uid)
            producer.revive(producer.connection.channel())
            hand_off()

    def on_bad_request(self, message: Message, error: RequestError) -> None:
        """Dead-letter the message and tell the client, if it can be reached."""
        uid = error.uid
        logger.warning("uid=%s: rejected (%s): %s", uid or "-", error.code, error.message)
        try:
            with self.app.pools.confirmed.acquire(block=True) as producer:
                dead_letter(
                    producer,
                    self.settings,
                    message.body,
                    error,
                    content_type=message.content_type or "application/octet-stream",
                    content_encoding=message.content_encoding or "binary",
                    headers=message.headers,
                )
                self._tell_client(producer, error)
        except BROKER_ERRORS as exc:
            logger.warning("uid=%s: could not dead-letter (%r); requeued", uid or "-", exc)
            self._settle(message, requeue=True)
            return
        self._settle(message, requeue=False)

    def _tell_client(self, producer: Any, error: RequestError) -> None:
        if error.reply_to:
            queue = error.reply_to
        elif error.uid:
            channel = declare_response_queue(producer.channel, self.settings, error.uid)
            producer.revive(channel)
            queue = self.settings.response_queue(error.uid)
        else:
            return

        def publish(body: str, routing_key: str, properties: dict[str, Any]) -> None:
            producer.publish(body, exchange="", routing_key=routing_key, **properties)

        ResponseStream(publish, queue, error.uid or "").fail(error.to_error_object(), error.status)

    @staticmethod
    def _settle(message: Message, *, requeue: bool) -> None:
        try:
            if requeue:
                message.requeue()
            else:
                message.ack()
        except Exception as exc:  # the channel is gone: the broker redelivers
            logger.warning("could not settle an input message: %r", exc)
