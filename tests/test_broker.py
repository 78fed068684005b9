"""app/broker.py's uses of py-amqp private attributes, checked against the
installed py-amqp: this fails when ``transport._read_buffer`` or
``transport._write`` moves; a lane's writes; and the connections of a
``;``-separated RABBITMQ_URL walk the list."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import amqp
import pytest
from kombu import Connection
from kombu import Consumer as KombuConsumer
from kombu import Queue as KombuQueue

from app.broker import Lane, Sender, frames_waiting, one_write
from app.shutdown import Orphaned, TaskLink, losses, peer_gone
from tests.support import RABBITMQ_URL, Broker, free_port, wait_until
from web.router import connect


def test_frames_waiting_sees_py_amqps_read_buffer() -> None:
    with Connection(RABBITMQ_URL, heartbeat=0) as connection:
        amqp = connection.connection
        transport = amqp.transport
        assert hasattr(transport, "_read_buffer")
        assert not frames_waiting(amqp)
        saved = transport._read_buffer
        transport._read_buffer = b"\x01"  # bytes already off the socket, not yet a frame
        try:
            assert frames_waiting(amqp)
        finally:
            transport._read_buffer = saved


# Run under gevent's monkey-patching, as in a worker or a web process.
NO_YIELD = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent
from kombu import Connection
from app.broker import frames_waiting

ran = []
with Connection(sys.argv[1], heartbeat=0) as connection:
    amqp = connection.connection
    gevent.spawn(ran.append, "another greenlet")
    gevent.sleep(0)  # it runs once
    other = gevent.spawn(ran.append, "another greenlet, again")
    waiting = [frames_waiting(amqp) for _ in range(100)]
    assert not any(waiting), waiting
    assert ran == ["another greenlet"], ran  # the check never let it run
    other.join()
print("ok")
"""


def test_frames_waiting_never_lets_other_greenlets_run() -> None:
    """A loop of such checks (the intake's, the web readers') must not wait for
    every other ready greenlet on each turn: beside 1,000 streams that started
    again after a broker restart, an intake took 30 to 90 s to collect one
    batch, and its requests' readers were answered 404."""
    run_under_gevent(NO_YIELD, RABBITMQ_URL)


def run_under_gevent(script: str, *argv: str) -> None:
    """Run ``script`` in a Python of its own (it monkey-patches, as a worker
    does); it prints ``ok`` when all its checks held."""
    done = subprocess.run(
        [sys.executable, "-c", script, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_web_connects_to_the_first_node_of_the_list_that_answers() -> None:
    """Two nodes that are down (nothing listens on their ports), then the broker."""
    down = [f"amqp://guest:guest@127.0.0.1:{free_port()}/" for _ in range(2)]
    connection = connect(";".join([*down, RABBITMQ_URL]))
    try:
        assert connection.connected
        assert connection.connection.server_properties["product"] == "RabbitMQ"
    finally:
        connection.release()


def test_a_task_connection_that_broke_or_was_replaced_orphans_its_streams() -> None:
    """A stream knows the connection its task message came on (TaskLink notes
    it when the message comes) and stops once that one is broken, even while
    Celery has not noticed (a write failed), or replaced by a new one, even
    before the stream began."""
    consumer = SimpleNamespace(connection=Connection(RABBITMQ_URL, heartbeat=0))
    link = TaskLink()
    assert link.alive(link.current())  # nothing noted (no consumer here): nothing to check
    link.consumer = consumer
    try:
        consumer.connection.connect()
        first = consumer.connection
        # A message comes; Celery replaces the connection before its task begins.
        message = SimpleNamespace(delivery_info={"redelivered": False})
        link.received(message)
        noted = link.came_on(message.delivery_info)
        assert noted is consumer.connection.connection  # py-amqp's, under kombu's
        assert link.alive(noted)
        consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError):
            for _ in range(100):  # the broken socket is seen at a write
                consumer.connection.default_channel.basic_publish(
                    amqp.Message("x"), exchange="", routing_key="nowhere"
                )
        assert not link.alive(noted)

        later = SimpleNamespace(delivery_info={"redelivered": False})
        link.received(later)  # on the broken connection, Celery not knowing yet
        consumer.connection = Connection(RABBITMQ_URL, heartbeat=0)
        consumer.connection.connect()
        assert link.alive(link.current())
        assert not link.alive(noted)  # replaced: the old one's messages cannot be acked
        # The task of the later message begins now: it came on the old one.
        assert not link.alive(link.came_on(later.delivery_info))
    finally:
        consumer.connection.release()
        first.release()


def test_the_watchdog_reports_a_task_consumer_that_takes_no_task(queue: str) -> None:
    """Once for each connection, after UNNOTICED seconds: a consumer on no
    queue while its connection is up, and a connection broken unnoticed."""
    connection = Connection(RABBITMQ_URL, heartbeat=0)
    connection.connect()
    tasks = KombuConsumer(connection.channel(), queues=[KombuQueue(queue, durable=False)])
    link = TaskLink()
    link.consumer = SimpleNamespace(connection=connection, task_consumer=None)
    try:
        assert link.look(0.0) is None  # Celery between its steps: not yet
        assert "consumed from none of its queues for 16 s" in (link.look(16.0) or "")
        assert link.look(30.0) is None  # said once
        link.consumer.task_consumer = tasks
        assert link.look(31.0) is None
        tasks.consume()  # Celery's loop began
        assert link.look(50.0) is None

        connection.connection.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError):
            for _ in range(100):  # the broken socket is seen at a write
                connection.default_channel.basic_publish(
                    amqp.Message("x"), exchange="", routing_key="nowhere"
                )
        assert link.look(60.0) is None
        assert "broken for 15 s and Celery has not noticed" in (link.look(75.0) or "")
        assert link.look(90.0) is None
    finally:
        connection.release()


def test_the_watchdog_reports_a_task_consumer_left_without_a_connection() -> None:
    """Celery's consumer between its steps has no connection: while RabbitMQ
    is away that is its reconnecting; with RabbitMQ up (the intake's
    connection), for UNNOTICED seconds, it is stuck, and said once."""
    link = TaskLink()
    link.consumer = SimpleNamespace(connection=None, task_consumer=None)
    assert link.look(0.0) is None
    assert link.look(100.0) is None  # RabbitMQ away: reconnecting, not stuck
    link.broker_up = lambda: True
    assert link.look(101.0) is None
    assert "no connection for 16 s" in (link.look(117.0) or "")
    assert link.look(130.0) is None  # said once


def watched_consumer(url: str, queue: str) -> tuple[Connection, TaskLink]:
    """A real connection and kombu consumer on ``queue``: Celery's task
    consumer, as a :class:`TaskLink` sees it."""
    connection = Connection(url, heartbeat=0)
    connection.connect()
    tasks = KombuConsumer(connection.channel(), queues=[KombuQueue(queue, durable=False)])
    tasks.consume()
    link = TaskLink()
    link.consumer = SimpleNamespace(connection=connection, task_consumer=tasks)
    return connection, link


def test_a_consumer_left_on_a_connection_kombu_replaced_is_restarted(queue: str) -> None:
    """kombu's ``drain_events`` makes a lost connection again under the same
    kombu object, and Celery's loop reads the new one, on which nothing
    consumes. The link sees another connection (a stream from the old one
    stops); the watchdog, seeing it twice, says so and shuts the new one, so
    that the loop's next read fails and Celery starts its consumer again."""
    connection, link = watched_consumer(RABBITMQ_URL, queue)
    noted = link.current()
    try:
        assert link.look(0.0) is None
        noted.collect()  # the old connection goes (as py-amqp drops a broken one)
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.2)  # a new one, made quietly
        assert link.current() is not noted and link.current().connected
        assert not link.alive(noted)
        assert link.look(5.0) is None  # as in Celery's own restart, for a moment
        assert "made again under Celery's loop" in (link.look(10.0) or "")
        assert link.look(15.0) is None  # said once
        with pytest.raises(OSError):  # no longer a quiet timeout: Celery notices
            connection.drain_events(timeout=5)
    finally:
        with contextlib.suppress(OSError):
            connection.release()


def test_a_task_connection_the_broker_closed_unread_is_not_alive(queue: str) -> None:
    """The broker closes the connection of a consumer whose loop does not read
    it: kombu still calls it connected. Once a loss is counted in the process
    (the intake's), a stream's link asks the socket itself, and stops; the
    watchdog reports the connection."""
    parts = urlsplit(RABBITMQ_URL)
    relay = Relay(parts.hostname or "localhost", parts.port or 5672)
    url = urlunsplit(
        parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{relay.port}")
    )
    connection, link = watched_consumer(url, queue)
    noted = link.current()
    try:
        losses.lost()  # another connection's loss: this one is asked, and up
        assert link.alive(noted) and not peer_gone(noted)
        assert link.look(0.0) is None

        relay.reset()
        wait_until(lambda: peer_gone(noted), 10, "the reset connection was never seen gone")
        assert connection.connected  # nothing read it: kombu has not noticed
        losses.lost()  # the intake, which reads all the time, noticed
        assert not link.alive(noted)
        assert link.look(10.0) is None
        assert "broken for 15 s and Celery has not noticed" in (link.look(25.0) or "")
    finally:
        relay.close()
        with contextlib.suppress(OSError):
            connection.release()


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue of this test's own on the shared broker, deleted at the end."""
    name = f"test-lane-{uuid.uuid4().hex[:12]}"
    with Connection(RABBITMQ_URL, heartbeat=0) as connection:
        connection.default_channel.queue_declare(name, auto_delete=False)
        yield name
        connection.default_channel.queue_delete(name)


def _bodies(broker: Broker, name: str, count: int) -> list[str]:
    """The messages of queue ``name``, once ``count`` are there (10 s at most)."""
    wait_until(lambda: broker.queue_length(name) >= count, 10, f"fewer than {count} messages")
    return [m.text for m in broker.get_all(name)]


def test_one_write_sends_what_py_amqp_writes_at_the_end_of_the_block(
    queue: str, broker: Broker
) -> None:
    """The one use of py-amqp's private ``transport._write`` (the socket's
    ``sendall``): this fails when it moves."""
    with Connection(RABBITMQ_URL, heartbeat=0) as connection:
        channel = connection.default_channel
        transport = channel.connection.transport
        assert transport._write == transport.sock.sendall
        assert callable(transport.read_frame)
        with one_write(channel):
            for n in range(3):
                channel.basic_publish(amqp.Message(f"m{n}"), exchange="", routing_key=queue)
        assert transport._write == transport.sock.sendall
    assert _bodies(broker, queue, 3) == ["m0", "m1", "m2"]


def test_one_write_writes_out_before_it_waits_for_the_broker(queue: str, broker: Broker) -> None:
    """A declare inside the block (Celery's first of a channel) is answered:
    what was written before it goes first."""
    with Connection(RABBITMQ_URL, heartbeat=0) as connection:
        channel = connection.default_channel
        transport = channel.connection.transport
        with one_write(channel):
            channel.basic_publish(amqp.Message("first"), exchange="", routing_key=queue)
            channel.queue_declare(queue, passive=True)  # waits for declare-ok
            channel.basic_publish(amqp.Message("second"), exchange="", routing_key=queue)
        assert "read_frame" not in vars(transport)
    assert _bodies(broker, queue, 2) == ["first", "second"]


def test_nothing_leaves_before_the_end_of_one_write(queue: str, broker: Broker) -> None:
    with Connection(RABBITMQ_URL, heartbeat=0) as connection:
        channel = connection.default_channel
        with one_write(channel):
            channel.basic_publish(amqp.Message("early"), exchange="", routing_key=queue)
            assert broker.queue_length(queue) == 0  # the broker has not seen it yet
        assert _bodies(broker, queue, 1) == ["early"]


def test_a_lane_keeps_each_streams_order_while_it_writes_many_streams_at_once(
    queue: str, broker: Broker
) -> None:
    """Twenty streams of fifty messages through one lane, from threads."""
    connection = Connection(RABBITMQ_URL, heartbeat=0)
    lane = Lane(connection)

    def stream(name: int) -> None:
        send = Sender(lane)
        for n in range(50):
            send(f"{name}:{n}", queue, {})
        send.settle()

    threads = [threading.Thread(target=stream, args=(name,)) for name in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        connection.release()
    bodies = _bodies(broker, queue, 1000)
    assert len(bodies) == 1000
    seen: dict[str, list[int]] = {}
    for body in bodies:
        name, n = body.split(":")
        seen.setdefault(name, []).append(int(n))
    assert seen == {str(name): list(range(50)) for name in range(20)}


def test_a_lane_sends_again_on_a_new_connection_what_a_broken_one_did_not_take(
    queue: str, broker: Broker
) -> None:
    connection = Connection(RABBITMQ_URL, heartbeat=0)
    send = Sender(Lane(connection))
    try:
        send("before", queue, {})
        send.settle()
        connection.connection.sock.shutdown(socket.SHUT_RDWR)
        for n in range(3):
            send(f"after{n}", queue, {})
        send.settle()
        assert _bodies(broker, queue, 4) == ["before", "after0", "after1", "after2"]
    finally:
        connection.release()


def test_a_stream_that_lost_its_task_message_hears_it_and_sends_nothing_more(
    queue: str, broker: Broker
) -> None:
    """A connection lost after the stream began (``losses``): what it hands
    over is dropped, and the stream hears ``Orphaned`` at its next message."""
    connection = Connection(RABBITMQ_URL, heartbeat=0)
    send = Sender(Lane(connection), since=losses.count)
    try:
        send("kept", queue, {})
        send.settle()
        losses.lost()
        send("dropped", queue, {})
        with pytest.raises(Orphaned):
            send.settle()
        send("after", queue, {})
        with pytest.raises(Orphaned):
            send.settle()
        assert _bodies(broker, queue, 1) == ["kept"]
        assert broker.queue_length(queue) == 0
    finally:
        connection.release()


# Run under gevent's monkey-patching, as in a worker. argv: broker host, port, queue.
KILLED_WHILE_DRAINING = """
from gevent import monkey
monkey.patch_all()
import socket
import sys
import time
import gevent
from gevent.server import StreamServer
from kombu import Connection
from app.broker import Lane
from tasks.chat import _Publisher

host, port, queue = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spare = socket.create_server(("127.0.0.1", 0))
gone = spare.getsockname()[1]  # where "the broker" is away for now
spare.close()

def pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        sink.close()

def relay(client, _):
    broker = socket.create_connection((host, port))
    gevent.spawn(pipe, broker, client)
    pipe(client, broker)

publisher = _Publisher(Lane(Connection(f"amqp://guest:guest@127.0.0.1:{gone}/", heartbeat=0)), None)
after = []

def stream():
    publisher("the last message", queue, {})
    publisher.drain()
    after.append(time.monotonic())  # what stream_chat does next: runs.end(...)

task = gevent.spawn(stream)
gevent.sleep(0.5)  # the lane's writer cannot connect, and tries again
killed = time.monotonic()
gevent.kill(task)  # as Celery cancels the tasks of a connection it lost
gevent.sleep(0.5)
StreamServer(("127.0.0.1", gone), relay).start()  # the broker is back
task.join(timeout=30)
assert task.dead and task.successful(), task.exception
assert after and after[0] > killed + 0.5, after  # it waited for its message
with Connection(f"amqp://guest:guest@{host}:{port}/", heartbeat=0) as direct:
    deadline = time.monotonic() + 10  # the relay passes it on
    while not direct.default_channel.queue_declare(queue, passive=True).message_count:
        assert time.monotonic() < deadline, "the message never reached the broker"
        gevent.sleep(0.05)
print("ok")
"""


def test_a_stream_killed_while_its_messages_drain_ends_after_them(
    queue: str, broker: Broker
) -> None:
    """Celery kills the tasks of a connection it lost (gevent.kill), often
    while a stream that saw the loss first waits for its lane, which
    reconnects: the stream goes on to its end once its messages are out (a
    kill let through would skip its end: its request's task message, never
    acknowledged, would come back again and again)."""
    parts = urlsplit(RABBITMQ_URL)
    run_under_gevent(
        KILLED_WHILE_DRAINING, parts.hostname or "localhost", str(parts.port or 5672), queue
    )
    assert _bodies(broker, queue, 1) == ["the last message"]


class Relay:
    """A TCP relay to the broker whose connections can be told to stop
    passing on what the broker says (its confirms, say), as a connection to
    a channel that sends to a dead quorum queue leader gets no confirm."""

    def __init__(self, host: str, port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._to = (host, port)
        self._muted: set[socket.socket] = set()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(self._to)
            self._open += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if source not in self._muted:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        """The broker's side of each open connection goes at once (a reset,
        where the platform sends one for a socket shut down with linger 0)."""
        for client in self._open[0::2]:
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.shutdown(socket.SHUT_RDWR)

    def mute(self) -> None:
        """From now on, what the broker says on the open connections is dropped."""
        self._muted.update(self._open[1::2])

    def close(self) -> None:
        self._listener.close()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.close()


def test_a_confirm_that_does_not_come_renews_the_connection_and_the_message_goes_again(
    queue: str, broker: Broker
) -> None:
    """A lane in confirm mode (quorum response queues, CONFIRM_CHUNKS) waits
    ``confirm_timeout`` for each confirm; then it sends the message again on
    a new connection. This one reached the broker, and so comes twice."""
    parts = urlsplit(RABBITMQ_URL)
    relay = Relay(parts.hostname or "localhost", parts.port or 5672)
    url = urlunsplit(
        parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{relay.port}")
    )
    connection = Connection(url, transport_options={"confirm_publish": True}, heartbeat=0)
    send = Sender(Lane(connection, confirm_timeout=1.0))
    try:
        send("first", queue, {})
        send.settle()
        relay.mute()
        started = time.monotonic()
        send("second", queue, {})
        send.settle()
        assert time.monotonic() - started >= 1.0  # it waited for the confirm first
        assert _bodies(broker, queue, 3) == ["first", "second", "second"]
    finally:
        connection.release()
        relay.close()
