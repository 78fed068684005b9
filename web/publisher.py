"""Publishing submitted requests: many greenlets, one connection, confirms in flight.

A burst of submissions must not wait for each other's confirms. A
:class:`Publisher` is one AMQP connection with one channel in confirm mode:

* a greenlet that submits takes the lock only to write its frames (the
  response queue's declare, unanswered, and the request), notes the delivery
  tag the broker will confirm, and waits, without the lock, for that confirm;
* one reader greenlet waits until the socket is readable, then reads the
  frames that are there, and resolves every waiting tag a ``basic.ack``
  covers (RabbitMQ confirms many at once with ``multiple``), or fails it on
  ``basic.nack``.

So a thousand requests cost a thousand writes and a few confirm frames, and
the broker writes their persistent messages to disk in batches.

The routes that read an answer at once, in the process that submitted it
(the OpenAI drop-in, the WebSocket), have it sent back to the process's own
reply queue, ``<namespace>.replies.<token>`` (:class:`ReplyBook`): one
durable queue per process, made once, consumed by the publisher's channel;
each request carries it in ``reply_to``, and the reader greenlet hands each
reply to its :class:`Replies` by correlation id (the uid). No queue is made
or deleted per request: on this broker a durable queue cost 4 to 7 ms of its
CPU to make and 2 to 4 ms to delete. Unlike RabbitMQ's direct reply-to,
which this replaced, the queue outlives the connection: when RabbitMQ
restarts, the answers being read wait (up to ``WEB_RECONNECT_TIMEOUT``)
while the process reconnects and consumes its queue again, and what the
workers wrote meanwhile, or wrote again after their own reconnect
(``replay``), is there. It costs the broker about 6 µs of CPU more per
reply than direct reply-to (39 against 33 ms per 1,000 chunk-sized
messages, ``python -m bench.reply_queue``). Replies are not acknowledged
(no prefetch: RabbitMQ pushes each reply as it is written), so what a
client has not read waits in this process: up to ``WEB_REPLY_BUFFER`` bytes
of answer. Past that the answer ends with ``reader_too_slow`` and its LLM
call is cancelled (:class:`Replies`); a client that never read its socket
had its web process hold the whole answer (one drop-in stream of 400,000
tokens took it from 45 to 283 MiB). Those routes have no resume (the
client's connection is the answer's).

A broken connection fails every waiting submission with
:class:`BrokerUnavailable` (the route's retry takes a new connection);
nothing connects at import time.

During a memory or disk alarm RabbitMQ stops reading from connections that
publish, and tells them so (``connection.blocked``, then
``connection.unblocked``): while blocked, a submission is refused at once
with :class:`BrokerBlocked` (503 and ``Retry-After``) instead of waiting
for a confirm that comes only when the alarm clears. A confirm that does not
come within ``WEB_PUBLISH_TIMEOUT`` (the publish that made the broker block
this connection, say) is a 503 too, not a hang; RabbitMQ only says it
blocks a connection once it published during the alarm, and the
submissions then awaiting a confirm are answered 503 at once. Such a
request may still be answered when the alarm clears.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

import amqp
import gevent
from amqp.exceptions import ChannelError, NotFound
from gevent.event import AsyncResult

from app.broker import reply_queue_arguments, response_queue_arguments
from app.errors import BrokerBlocked, BrokerUnavailable
from app.request import TENANT_HEADER
from config import Settings
from web.errors import ReaderTooSlow
from web.router import LINK_ERRORS, Delivery, Inbox, SharedConnection

logger = logging.getLogger(__name__)


class ReplyBook:
    """A web process's reply queue, and the answers awaited on it: one
    book for the process's successive publishers (connections)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = ""
        self.waiting: dict[str, Replies] = {}
        self.renew()

    def renew(self) -> None:
        """A queue of a new name; the answers awaited on the old one fail.

        RabbitMQ refuses to declare a durable classic queue whose node is
        down (a cluster's): this process then asks for its answers on
        another queue, and those that were coming to the old one are lost."""
        self.queue = f"{self.settings.reply_queue_prefix}{secrets.token_hex(16)}"
        self.fail(BrokerUnavailable("the reply queue of this web process was lost; ask again"))

    def add(self, replies: Replies) -> None:
        self.waiting[replies.uid] = replies

    def forget(self, replies: Replies) -> None:
        if self.waiting.get(replies.uid) is replies:
            del self.waiting[replies.uid]

    def fail(self, error: BaseException) -> None:
        """End every answer awaited: they will not come."""
        waiting, self.waiting = self.waiting, {}
        for replies in waiting.values():
            replies.interrupt(error)


class Replies(Inbox):
    """The answer of one request sent back to the process's reply queue: what
    :class:`web.responses.Answer` reads, as it reads a response queue.

    It takes a reply while at most ``limit`` bytes of answer bodies wait
    unread, and the last one of an answer always (so one completion larger
    than that still comes whole); a reply past it ends the answer instead:
    this uid's replies are no longer taken, those held are dropped, the
    reader gets :class:`ReaderTooSlow` next, and ``on_overflow`` (its
    answer's cancel) is called at once, while the reader may still be stuck
    writing to its client."""

    def __init__(self, book: ReplyBook, uid: str, limit: int) -> None:
        super().__init__()
        self.book = book
        self.uid = uid
        self.limit = limit
        self.held = 0  # bytes of bodies put and not read yet
        self.on_overflow: Callable[[], None] | None = None

    def put(self, item: Delivery | BaseException) -> None:
        # What a worker writes again after it lost its connection (``replay``,
        # up to CARRY_ON_KEEP bytes at once) is mostly what the client has,
        # which its reader skips: it is not the client's to read, and does not
        # count (counted, the replay of a long answer would end it as
        # reader_too_slow while its reader skips it).
        if isinstance(item, Delivery) and not item.replay:
            if self.held > self.limit and not item.final:
                self._overflow()
                return
            self.held += len(item.body)
        super().put(item)

    def get(self, timeout: float | None) -> Delivery | None:
        delivery = super().get(timeout)
        if delivery is not None and not delivery.replay:
            self.held -= len(delivery.body)
        return delivery

    def _overflow(self) -> None:
        self.book.forget(self)
        self.drop()
        self.held = 0
        logger.warning(
            "uid=%s: its client has not read %d bytes of its answer (WEB_REPLY_BUFFER); "
            "the answer ends with reader_too_slow",
            self.uid,
            self.limit,
        )
        self.interrupt(
            ReaderTooSlow(
                f"this client did not read its answer: more than {self.limit} bytes of it "
                "waited (WEB_REPLY_BUFFER), and the rest was not generated; read faster, or "
                "use the SSE route, whose answer waits in its queue"
            )
        )
        if self.on_overflow is not None:
            self.on_overflow()

    def close(self, *, delete: bool) -> None:
        """Stop taking this uid's replies (there is no queue of its own to delete)."""
        self.book.forget(self)


class Publisher(SharedConnection):
    """One connection publishing the requests of many greenlets (see the module)."""

    def __init__(
        self,
        settings: Settings,
        book: ReplyBook,
        after_lost: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(settings, "publisher")
        self.book = book
        self.after_lost = after_lost
        self.channel = self._reply_channel()
        # Before any worker has: a message to a queue that does not exist is
        # dropped by the broker, and confirmed all the same.
        self.channel.queue_declare(
            queue=settings.rabbitmq_queue,
            durable=True,
            auto_delete=False,
            arguments=settings.queue_arguments,
        )
        self.channel.confirm_select()
        self.channel.basic_consume(book.queue, no_ack=True, callback=self._on_reply)
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self._next_tag = 1
        self._waiting: dict[int, AsyncResult[bool]] = {}
        # Why RabbitMQ blocks this connection (a resource alarm), or None.
        self.blocked: str | None = None
        self.amqp.on_blocked = self._on_blocked
        self.amqp.on_unblocked = self._on_unblocked
        self.start_reading()

    def _reply_channel(self) -> Any:
        """A channel, once the book's reply queue is declared (of a new name
        if RabbitMQ refuses the old one: its node is down)."""
        channel = self.amqp.channel()
        try:
            self._declare_replies(channel)
        except ChannelError as exc:
            logger.warning(
                "publisher: reply queue %s cannot be declared (%s); a new one is used, "
                "and the %d answers awaited on it end with an error",
                self.book.queue,
                exc,
                len(self.book.waiting),
            )
            self.book.renew()
            channel = self.amqp.channel()
            self._declare_replies(channel)
        return channel

    def _declare_replies(self, channel: Any) -> None:
        channel.queue_declare(
            queue=self.book.queue,
            durable=True,
            auto_delete=False,
            arguments=reply_queue_arguments(self.settings),
        )

    def submit(
        self,
        uid: str,
        body: bytes,
        *,
        declare: bool = True,
        reply: bool = False,
        tenant: str | None = None,
    ) -> Replies | None:
        """Declare ``response_<uid>`` (with ``declare``) and publish ``body`` to
        the input queue, persistent; return once the broker confirmed it. With
        ``reply``, the answer comes back to the process's reply queue: its
        :class:`Replies`. ``tenant``: whose request it is, for the fair share."""
        settings = self.settings
        replies: Replies | None = None
        with self.lock:
            self._check_open()
            result: AsyncResult[bool] = AsyncResult()
            if reply:
                replies = Replies(self.book, uid, settings.web_reply_buffer)
                self.book.add(replies)
            try:
                if declare:
                    self.channel.queue_declare(
                        queue=settings.response_queue(uid),
                        durable=True,
                        auto_delete=False,
                        arguments=response_queue_arguments(settings),
                        nowait=True,
                    )
                properties: dict[str, Any] = {"reply_to": self.book.queue} if reply else {}
                if tenant is not None:
                    properties["application_headers"] = {TENANT_HEADER: tenant}
                self.channel.basic_publish(
                    amqp.Message(
                        body,
                        content_type="application/json",
                        content_encoding="utf-8",
                        delivery_mode=2,
                        **properties,
                    ),
                    exchange="",
                    routing_key=settings.rabbitmq_queue,
                )
            except LINK_ERRORS as exc:
                self.fail(exc)
                raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc
            tag = self._next_tag
            self._waiting[tag] = result
            self._next_tag += 1
        try:
            # wait(), not get(timeout=): a caller's own gevent.Timeout passes through.
            result.wait(settings.web_publish_timeout)
            if result.ready():
                if not result.get():
                    raise BrokerUnavailable("RabbitMQ refused the request (nack); try again later")
                return replies
            self._waiting.pop(tag, None)
            raise BrokerBlocked(
                f"RabbitMQ did not confirm the request within {settings.web_publish_timeout:g} s "
                "(WEB_PUBLISH_TIMEOUT); it may be blocked by a memory or disk alarm. Try again "
                "later (the request may still be answered when the broker takes it)"
            )
        except BaseException:
            if replies is not None:
                self.book.forget(replies)
            raise

    def _on_reply(self, message: Any) -> None:
        uid = (message.properties or {}).get("correlation_id")
        replies = self.book.waiting.get(uid) if isinstance(uid, str) else None
        if replies is not None:
            replies.put(Delivery.from_message(message))

    def queue_exists(self, name: str) -> bool:
        """Whether queue ``name`` exists (asked on a channel of its own: a missing
        queue closes the channel it is asked on)."""
        with self.lock:
            self._check_open()
            # A blocked connection is not read by the broker: bound the wait.
            timer = gevent.Timeout(self.settings.web_publish_timeout)
            try:
                with timer:
                    return self._ask_exists(name)
            except gevent.Timeout as exc:
                self.fail(exc)  # a call cut off half way: the connection is no good
                if exc is not timer:
                    raise  # a caller's own timeout
                raise BrokerBlocked(
                    "RabbitMQ did not answer within "
                    f"{self.settings.web_publish_timeout:g} s (WEB_PUBLISH_TIMEOUT); "
                    "it may be blocked by a memory or disk alarm. Try again later"
                ) from None
            except LINK_ERRORS as exc:
                self.fail(exc)
                raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc

    def _ask_exists(self, name: str) -> bool:
        channel = self.amqp.channel()
        try:
            channel.queue_declare(queue=name, passive=True)
        except NotFound:
            return False
        finally:
            if channel.is_open:
                channel.close()
        return True

    def _check_open(self) -> None:
        """Refuse at once what cannot be published now (under the lock)."""
        if self.error is not None:
            raise BrokerUnavailable(f"the connection to RabbitMQ was lost: {self.error}")
        if self.blocked is not None:
            raise BrokerBlocked(
                f"RabbitMQ is not taking requests now ({self.blocked}: a memory or disk "
                "alarm); try again later"
            )

    def _on_blocked(self, reason: str) -> None:
        """RabbitMQ says so once this connection publishes during an alarm: the
        confirms awaited now come only when it clears, so they are 503 now."""
        waiting, self._waiting = self._waiting, {}
        logger.warning(
            "publisher: RabbitMQ blocks publishing (%s); submissions are 503, "
            "%d awaiting a confirm included",
            reason,
            len(waiting),
        )
        self.blocked = reason or "connection blocked"
        for result in waiting.values():
            result.set_exception(
                BrokerBlocked(
                    "RabbitMQ stopped taking requests (a memory or disk alarm) before it "
                    "confirmed this one; try again later (this request may still be answered "
                    "when the alarm clears)"
                )
            )

    def _on_unblocked(self) -> None:
        if self.blocked is not None:
            logger.info("publisher: RabbitMQ takes requests again")
        self.blocked = None

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, True)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, False)

    def _settle(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        tags = [t for t in self._waiting if t <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            result = self._waiting.pop(tag, None)
            if result is not None:
                result.set(ok)

    def on_lost(self, error: BaseException) -> None:
        """The submissions awaiting a confirm fail; the answers awaited wait
        for the next publisher (``after_lost``: the process reconnects)."""
        logger.warning(
            "publisher: connection to RabbitMQ lost (%r); %d submissions fail, "
            "%d answers wait for a new connection",
            error,
            len(self._waiting),
            len(self.book.waiting),
        )
        lost = f"the connection to RabbitMQ was lost: {error}"
        waiting, self._waiting = self._waiting, {}
        for result in waiting.values():
            result.set_exception(BrokerUnavailable(lost))
        if self.after_lost is not None:
            self.after_lost(error)

    @property
    def usable(self) -> bool:
        return self.error is None
