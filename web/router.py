"""The per-process router of response queues: many streams, few connections.

A web process holds thousands of streams at once. A broker connection per
stream would cost a TCP connection, a login and a reader each; instead the
process keeps a few *links* and multiplexes the streams over them:

* A :class:`Link` is one AMQP connection. Every synchronous AMQP call on it
  (open a channel, consume, delete a queue, close a channel) is made by the
  greenlet that needs it, holding the link's lock: py-amqp is not
  greenlet-safe, the lock makes it so, and the caller gets the broker's reply
  (or error) directly.
* One reader greenlet per link waits, *without* the lock, until the socket is
  readable, then takes the lock and reads every frame that is there. py-amqp
  hands each delivery to its stream's callback, which only puts it into that
  stream's gevent queue. Whoever holds the lock reads the frames, so a
  delivery that arrives during another greenlet's call is dispatched as well.
  Nothing polls: a token is forwarded as soon as its frame arrives, and a new
  stream's ``basic_consume`` never waits for the reader.
* A :class:`Stream` is one channel with one exclusive consumer on
  ``response_<uid>``, with a prefetch and late acknowledgements: a second
  reader of the same uid is refused (409), a missing queue is 404, and a
  channel error ends only that stream.
* A link carries at most ``WEB_STREAMS_PER_CONNECTION`` streams (and fewer
  than the broker's ``channel_max``); more links open as needed. A link that
  breaks (the broker restarted) tells its streams with
  :class:`~app.errors.BrokerUnavailable`, and is replaced: their readers
  (:class:`web.responses.Answer`) consume again on a new link.

Nothing connects at import time: the router of a process is made on first
use, after gunicorn's fork and gevent's monkey-patching.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import gevent
from amqp.exceptions import (
    AccessRefused,
    AMQPError,
    ChannelError,
    NotFound,
    PreconditionFailed,
    ResourceLocked,
)
from amqp.exceptions import ConnectionError as AMQPConnectionError
from gevent.lock import Semaphore
from gevent.queue import Empty, Queue
from gevent.socket import wait_read
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from app.broker import frames_waiting
from app.errors import BrokerUnavailable
from app.protocol import DONE
from config import Settings
from web.accepted import Accepted
from web.errors import StreamBusy, UnknownStream

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
# Once a frame has begun to arrive, the rest of it comes within this time or
# the link is taken for dead.
FRAME_TIMEOUT = 10.0
# Seconds the input queue's backlog is taken as known (readers waiting for a
# response queue ask for it).
BACKLOG_CACHE = 1.0
# Messages of one stream taken from RabbitMQ ahead of its reader.
READ_AHEAD = 64
# Messages written to a client and still kept in RabbitMQ (unacknowledged):
# those a dropped connection may have lost on the way, for a reader that
# resumes. Between RESUME_WINDOW and twice that; acknowledged in batches.
RESUME_WINDOW = 8
# Frames a reader greenlet reads before it lets the others run.
YIELD_EVERY = 256
# Errors that mean the connection itself is gone.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    AMQPConnectionError,
    OperationalError,
    OSError,
    EOFError,
)


def connect(url: str, timeout: float = CONNECT_TIMEOUT) -> Any:
    """A connected kombu ``Connection`` (typed ``Any``: kombu's API is untyped).

    ``url`` may be a ``;``-separated list of a cluster's nodes (kombu's
    failover list): each is tried once, in turn, until one answers; a lone
    URL is tried twice, as kombu's ``connect()`` does."""
    factory: Any = Connection
    connection = factory(url, heartbeat=0, connect_timeout=timeout)
    connection.ensure_connection(
        max_retries=max(1, len(connection.alt) - 1), reraise_as_library_errors=False
    )
    return connection


def read_frames(
    amqp: Any, lock: Semaphore, alive: Callable[[], bool], fail: Callable[[BaseException], None]
) -> None:
    """The reader greenlet of a connection shared by many greenlets: wait,
    without ``lock``, until the socket is readable, then take the lock and
    read every frame that is there (py-amqp dispatches each to its callback),
    while ``alive()``. What breaks the connection goes to ``fail``."""
    try:
        fileno = amqp.transport.sock.fileno()
        while alive():
            if not frames_waiting(amqp):
                wait_read(fileno)
            with lock:
                read = 0
                while alive() and frames_waiting(amqp):
                    amqp.drain_events(timeout=FRAME_TIMEOUT)
                    read += 1
                    if read % YIELD_EVERY == 0:
                        gevent.sleep(0)  # the streams it filled get their turn
    except gevent.GreenletExit:
        raise
    except TimeoutError as exc:
        fail(TimeoutError(f"a frame did not arrive whole in {FRAME_TIMEOUT} s: {exc}"))
    except Exception as exc:
        fail(exc)


class LinkDown(Exception):
    """The link's connection broke; the stream may be tried on another link."""


@dataclass(frozen=True)
class Delivery:
    """One message of a response queue (see :mod:`app.protocol`)."""

    body: str
    kind: str | None
    seq: int | None
    status: int | None = None
    restart: bool = False
    rid: str | None = None  # the incarnation that wrote it (app.lifecycle)
    tag: int | None = None  # its delivery tag, to acknowledge once written
    run: str | None = None  # the run of the answer it belongs to (app.protocol)
    replay: bool = False  # written again by the same worker after a lost connection

    @property
    def done(self) -> bool:
        return self.body == DONE

    @property
    def final(self) -> bool:
        """Whether the worker has nothing more to produce after this message."""
        return self.done or self.kind in ("completion", "error")

    @classmethod
    def from_message(cls, message: Any) -> Delivery:
        body = message.body
        if isinstance(body, bytes | bytearray | memoryview):
            body = bytes(body).decode("utf-8", "replace")
        properties = message.properties or {}
        headers = properties.get("application_headers") or {}
        return cls(
            body=str(body),
            kind=properties.get("type"),
            seq=_int_or_none(headers.get("seq")),
            status=_int_or_none(headers.get("status")),
            restart=bool(headers.get("restart")),
            rid=_str_or_none(headers.get("rid")),
            tag=getattr(message, "delivery_tag", None),
            run=_str_or_none(headers.get("run")),
            replay=bool(headers.get("replay")),
        )


def _str_or_none(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _int_or_none(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str | bytes) and value.strip().isdigit():
        return int(value)
    return None


class Inbox:
    """The deliveries of one answer, in order, as they come; :meth:`get` the next."""

    def __init__(self) -> None:
        self._inbox: Queue[Delivery | BaseException] = Queue()

    def put(self, item: Delivery | BaseException) -> None:
        self._inbox.put(item)

    def get(self, timeout: float | None) -> Delivery | None:
        """The next delivery; None after ``timeout`` seconds of silence.

        Raises what :meth:`interrupt` was given, :class:`BrokerUnavailable`
        when the connection broke, :class:`UnknownStream` when the queue was
        deleted.
        """
        try:
            item: Delivery | BaseException = self._inbox.get(timeout=timeout)
        except Empty:
            return None
        if isinstance(item, BaseException):
            self._inbox.put(item)  # every later call raises it too
            raise item
        return item

    def interrupt(self, error: BaseException) -> None:
        """Make the waiting (or next) :meth:`get` raise ``error``."""
        self._inbox.put(error)

    def drop(self) -> None:
        """Forget every delivery not taken yet."""
        while not self._inbox.empty():
            self._inbox.get_nowait()


class Stream(Inbox):
    """The consumer of one response queue; :meth:`get` the next delivery.

    Deliveries are acknowledged late, ``RESUME_WINDOW`` behind the one being
    written, several at a time: a reader that does not keep up leaves the
    rest of its answer in RabbitMQ (READ_AHEAD bounds what this process
    holds), and a stream that breaks off leaves its last written messages
    there too, so a reader that resumes gets whatever its client may have
    missed when the connection dropped (and skips what it had: see
    :class:`web.responses.Resume`).
    """

    def __init__(self, link: Link, uid: str, queue: str) -> None:
        super().__init__()
        self.link = link
        self.uid = uid
        self.queue = queue
        self.channel: Any = None
        self._closed = False
        self._written: list[int] = []  # tags handed out and not acknowledged yet

    def get(self, timeout: float | None) -> Delivery | None:
        if len(self._written) >= 2 * RESUME_WINDOW:
            tag = self._written[-RESUME_WINDOW - 1]
            del self._written[:-RESUME_WINDOW]
            try:
                with self.link.locked():
                    if self.channel is not None:
                        self.channel.basic_ack(tag, multiple=True)
            except LinkDown:
                pass  # the broker gives them back: a reader that resumes skips them
        delivery = super().get(timeout)
        if delivery is not None and delivery.tag is not None:
            self._written.append(delivery.tag)
        return delivery

    def on_message(self, message: Any) -> None:
        self.put(Delivery.from_message(message))

    def on_cancel(self, consumer_tag: str) -> None:
        if not self._closed:
            logger.info("uid=%s: %s was deleted while being read", self.uid, self.queue)
            self.interrupt(UnknownStream(f"the response queue of uid {self.uid} was deleted"))

    def close(self, *, delete: bool) -> None:
        """Stop consuming; with ``delete``, remove the response queue as well."""
        if self._closed:
            return
        self._closed = True
        try:
            with self.link.locked():
                if self.channel is not None:
                    # Closing the channel ends the consumer; a delete on the
                    # consuming channel would have the broker cancel the
                    # consumer while the channel closes.
                    self.channel.close()
                if delete:
                    try:
                        self.link.admin.queue_delete(self.queue)
                    except ChannelError as exc:  # py-amqp reopens the channel
                        logger.warning("uid=%s: could not delete %s: %r", self.uid, self.queue, exc)
        except LinkDown:
            pass
        finally:
            self.channel = None
            self.link.release(self)


class SharedConnection:
    """One AMQP connection that many greenlets use.

    A greenlet makes a synchronous call holding ``lock``; one reader greenlet
    (:func:`read_frames`) dispatches what arrives in between. When the
    connection breaks, :meth:`on_lost` tells its users, and it is closed.
    """

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.connection = connect(settings.rabbitmq_url)
        self.amqp = self.connection.connection
        self.lock = Semaphore()
        self.error: BaseException | None = None
        self._reader: gevent.Greenlet[Any, Any] | None = None

    def start_reading(self) -> None:
        self._reader = gevent.spawn(
            read_frames, self.amqp, self.lock, lambda: self.error is None, self.fail
        )

    def on_lost(self, error: BaseException) -> None:
        """Tell the users of the connection that it broke."""

    def fail(self, error: BaseException) -> None:
        """The connection is gone: tell its users, and close it."""
        if self.error is not None:
            return
        self.error = error
        self.on_lost(error)
        if self._reader is not None and gevent.getcurrent() is not self._reader:
            self._reader.kill(block=False)
        try:
            self.connection.collect()
        except Exception as exc:  # pragma: no cover - closing a broken socket
            logger.debug("%s: while closing: %r", self.name, exc)


class Link(SharedConnection):
    """One AMQP connection carrying many streams, read by one greenlet."""

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, name)
        # For queue deletions: a channel of no stream.
        self.admin = self.amqp.channel()
        channel_max = self.amqp.channel_max or 65535
        self.capacity = max(1, min(settings.web_streams_per_connection, channel_max - 2))
        self.streams: set[Stream] = set()
        self.start_reading()
        logger.info("%s: connected (up to %d streams)", name, self.capacity)

    @property
    def usable(self) -> bool:
        return self.error is None and len(self.streams) < self.capacity

    @contextmanager
    def locked(self) -> Iterator[Any]:
        """The py-amqp connection, for this greenlet only; LinkDown if it broke."""
        with self.lock:
            if self.error is not None:
                raise LinkDown(str(self.error))
            try:
                yield self.amqp
            except LINK_ERRORS as exc:
                self.fail(exc)
                raise LinkDown(str(exc)) from exc

    def open(self, uid: str) -> Stream:
        """Consume ``response_<uid>``."""
        queue = self.settings.response_queue(uid)
        stream = Stream(self, uid, queue)
        self.streams.add(stream)  # the slot is taken before anything yields
        try:
            with self.locked() as amqp:
                channel = amqp.channel()
                # At most READ_AHEAD messages in this process; the rest of a
                # stream its reader is slow to take waits in RabbitMQ.
                channel.basic_qos(prefetch_size=0, prefetch_count=READ_AHEAD, a_global=False)
                try:
                    channel.basic_consume(
                        queue=queue,
                        no_ack=False,
                        exclusive=True,
                        callback=stream.on_message,
                        on_cancel=stream.on_cancel,
                    )
                except NotFound:
                    channel.close()
                    raise UnknownStream(
                        f"no response queue for uid {uid}: it was never submitted, "
                        "its answer was already read, or it expired (RESPONSE_QUEUE_TTL)"
                    ) from None
                except (AccessRefused, ResourceLocked):
                    channel.close()
                    raise StreamBusy(
                        f"the stream of uid {uid} is being read by another client"
                    ) from None
                stream.channel = channel
        except BaseException:
            self.release(stream)
            raise
        return stream

    def release(self, stream: Stream) -> None:
        self.streams.discard(stream)

    def on_lost(self, error: BaseException) -> None:
        logger.warning(
            "%s: connection to RabbitMQ lost (%r); %d streams will read again on a new one",
            self.name,
            error,
            len(self.streams),
        )
        for stream in list(self.streams):
            stream.interrupt(
                BrokerUnavailable(f"the connection to RabbitMQ was lost: {error}; read again")
            )

    def close(self) -> None:
        if self._reader is not None:
            self._reader.kill(block=True)
        with self.lock:
            try:
                self.connection.release()
            except (AMQPError, *LINK_ERRORS):
                self.connection.collect()


class Router:
    """The links of one web process, made on demand."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._links: list[Link] = []
        self._opening = Semaphore()
        self._count = 0
        self.accepted = Accepted(settings)
        self._backlog = False
        self._backlog_at = -BACKLOG_CACHE

    def open(self, uid: str, wait: float = 0.0) -> Stream:
        """A :class:`Stream` of ``response_<uid>``; a queue that does not exist
        yet (its request is still on its way to a worker) is waited for up to
        ``wait`` seconds.

        Raises :class:`UnknownStream` (404), :class:`StreamBusy` (409) or
        :class:`BrokerUnavailable` (503).
        """
        if wait > 0:
            return self.accepted.wait(uid, wait, lambda: self._open(uid), self.backlog)
        return self._open(uid)

    def backlog(self) -> bool:
        """Whether the input queue has requests waiting for a worker (asked
        of the broker at most every BACKLOG_CACHE seconds, for all readers)."""
        now = time.monotonic()
        if now - self._backlog_at >= BACKLOG_CACHE:
            self._backlog_at = now
            try:
                link = self._link()
                with link.locked():
                    ok = link.admin.queue_declare(self.settings.rabbitmq_queue, passive=True)
                self._backlog = ok.message_count > 0
            except (LinkDown, BrokerUnavailable, ChannelError):
                self._backlog = False
        return self._backlog

    def _open(self, uid: str) -> Stream:
        for attempt in (1, 2):
            link = self._link()
            try:
                return link.open(uid)
            except LinkDown as exc:
                if attempt == 2:
                    raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _link(self) -> Link:
        for link in self._links:
            if link.usable:
                return link
        with self._opening:
            self._links = [link for link in self._links if link.error is None]
            for link in self._links:
                if link.usable:
                    return link
            self._count += 1
            try:
                link = Link(self.settings, f"response-link-{self._count}")
            except (AMQPError, *LINK_ERRORS) as exc:
                raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc
            self._links.append(link)
            return link

    def delete_unused(self, queue: str) -> bool:
        """Delete ``queue`` unless a reader consumes it; whether it was deleted."""
        link = self._link()
        try:
            with link.locked():
                link.admin.queue_delete(queue, if_unused=True)
        except LinkDown as exc:
            raise BrokerUnavailable(f"RabbitMQ cannot be reached: {exc}") from exc
        except (PreconditionFailed, NotFound):  # being read again, or gone
            return False
        return True

    @property
    def stream_count(self) -> int:
        return sum(len(link.streams) for link in self._links)

    def close(self) -> None:
        for link in self._links:
            link.close()
        self._links = []
