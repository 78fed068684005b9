"""The private RabbitMQ nodes of tests/conftest.py: a node of its own that starts,
answers AMQP, survives a broker restart and ``kill -9`` with its durable
messages, and blocks publishers under a resource alarm; a three-node cluster
whose quorum queue survives ``kill -9`` of a node."""

from __future__ import annotations

import contextlib
import resource
import time
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from chatqueue_testing.rabbitnode import DEFAULT_NOFILE, RabbitCluster, RabbitNode, amqp_answers

# Each test starts a private RabbitMQ node or cluster, and most restart or kill it.
pytestmark = pytest.mark.slow

SHARED_PORT = 5672


def connect(url: str, **params: object) -> BlockingConnection:
    parameters = pika.URLParameters(url)
    for key, value in params.items():
        setattr(parameters, key, value)
    return pika.BlockingConnection(parameters)


@pytest.fixture
def channel(rabbit_node: RabbitNode) -> Iterator[BlockingChannel]:
    conn = connect(rabbit_node.url)
    ch = conn.channel()
    ch.confirm_delivery()
    yield ch
    # The test may have restarted or killed the broker under it.
    with contextlib.suppress(pika.exceptions.AMQPError):
        conn.close()


def durable_queue(ch: BlockingChannel, **arguments: object) -> str:
    name = f"cq-test-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(name, durable=True, arguments=dict(arguments) or None)
    return name


def publish(ch: BlockingChannel, queue: str, body: bytes) -> None:
    ch.basic_publish(
        "", queue, body, pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    )


def drain(url: str, queue: str) -> list[bytes]:
    conn = connect(url)
    try:
        ch = conn.channel()
        bodies = []
        while True:
            method, _, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            conn.close()


def test_node_is_private(rabbit_node: RabbitNode) -> None:
    assert rabbit_node.port != SHARED_PORT
    assert rabbit_node.dist_port != 25672
    assert rabbit_node.nodename != "rabbit@localhost"
    assert amqp_answers(rabbit_node.port)
    assert f":{rabbit_node.port}" in rabbit_node.url
    assert rabbit_node.beam_pid is not None
    # The limit asked for, or the hard limit of this machine when that is lower.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = DEFAULT_NOFILE if hard == resource.RLIM_INFINITY else min(DEFAULT_NOFILE, hard)
    assert rabbit_node.open_files_limit() == wanted
    conn = connect(rabbit_node.url)
    assert conn.is_open
    conn.close()


def test_restart_app_keeps_durable_messages(
    rabbit_node: RabbitNode, channel: BlockingChannel
) -> None:
    queue = durable_queue(channel)
    publish(channel, queue, b"kept")

    rabbit_node.restart_app()

    # The client's connection was closed by the broker...
    with pytest.raises(pika.exceptions.AMQPError):
        channel.queue_declare(queue, passive=True)
        channel.connection.process_data_events(1)
    # ...and the message is there for the next one.
    assert drain(rabbit_node.url, queue) == [b"kept"]


def test_kill_and_start_keeps_durable_messages(
    rabbit_node: RabbitNode, channel: BlockingChannel
) -> None:
    queue = durable_queue(channel)
    publish(channel, queue, b"kept")  # confirmed: the message is on disk
    pid = rabbit_node.beam_pid
    # The queue's own record is written behind (Mnesia's transaction log, with
    # Erlang's delayed write of up to 2 s): a kill -9 at once can lose the
    # queue. Sync that log to disk first, as a clean stop would.
    rabbit_node.ctl("eval", "mnesia:sync_log().")

    rabbit_node.kill()
    assert not rabbit_node.running()
    assert not amqp_answers(rabbit_node.port)
    rabbit_node.start()

    assert rabbit_node.beam_pid not in (None, pid)
    assert drain(rabbit_node.url, queue) == [b"kept"]


def test_memory_alarm_blocks_publishers_until_cleared(
    rabbit_node: RabbitNode, channel: BlockingChannel
) -> None:
    queue = durable_queue(channel)
    watcher = connect(rabbit_node.url, blocked_connection_timeout=None)
    events: list[str] = []
    watcher.add_on_connection_blocked_callback(lambda *_: events.append("blocked"))
    watcher.add_on_connection_unblocked_callback(lambda *_: events.append("unblocked"))
    watching = watcher.channel()

    def wait_for(event: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while event not in events and time.monotonic() < deadline:
            watcher.process_data_events(0.1)
        assert event in events

    rabbit_node.set_memory_alarm()  # returns once the node lists the alarm

    # A confirmed publish does not complete: pika gives up after its timeout.
    impatient = connect(rabbit_node.url, blocked_connection_timeout=2)
    confirmed = impatient.channel()
    confirmed.confirm_delivery()
    started = time.monotonic()
    with pytest.raises(pika.exceptions.ConnectionBlockedTimeout):
        publish(confirmed, queue, b"during the alarm")
    assert time.monotonic() - started < 10

    # A publishing connection is told it is blocked...
    publish(watching, queue, b"held")
    wait_for("blocked")

    # ...and unblocked when the alarm clears; publishing works again.
    rabbit_node.clear_memory_alarm()
    wait_for("unblocked")
    publish(channel, queue, b"after the alarm")
    watcher.close()
    assert b"after the alarm" in drain(rabbit_node.url, queue)


def test_quorum_queue_survives_kill_of_a_node(rabbit_cluster: RabbitCluster) -> None:
    assert len(rabbit_cluster.running_nodes()) == 3
    first, second, _ = rabbit_cluster.nodes
    conn = connect(first.url)
    ch = conn.channel()
    ch.confirm_delivery()
    queue = durable_queue(ch, **{"x-queue-type": "quorum"})
    for i in range(20):
        publish(ch, queue, b"%d" % i)
    conn.close()

    # The queue was declared on node 1, its leader: kill it.
    rabbit_cluster.kill(1)

    # Node 2 answers "nodedown" until the two left elect a new leader.
    deadline = time.monotonic() + 30
    while True:
        try:
            bodies = drain(second.url, queue)
            break
        except pika.exceptions.ConnectionClosedByBroker as exc:
            assert "nodedown" in str(exc)
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert bodies == [b"%d" % i for i in range(20)]
    rabbit_cluster.restart(1)
    assert len(rabbit_cluster.running_nodes()) == 3
    conn = connect(first.url)
    conn.channel().queue_delete(queue)
    conn.close()
