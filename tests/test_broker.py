"""app/broker.py's one use of a py-amqp private attribute, checked against the
installed py-amqp: this fails when ``transport._read_buffer`` moves; and the
connections of a ``;``-separated RABBITMQ_URL walk the list."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import amqp
import pytest
from kombu import Connection

from app.broker import frames_waiting
from app.shutdown import TaskLink
from tests.conftest import RABBITMQ_URL
from tests.support import free_port
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
    """A stream notes the connection its task message came on (TaskLink) and
    stops once that one is broken, even while Celery has not noticed (a write
    failed), or replaced by a new one."""
    consumer = SimpleNamespace(connection=Connection(RABBITMQ_URL, heartbeat=0))
    link = TaskLink()
    assert link.alive(link.current())  # nothing noted (no consumer here): nothing to check
    link.consumer = consumer
    try:
        consumer.connection.connect()
        noted = link.current()
        assert link.alive(noted)
        consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError):
            for _ in range(100):  # the broken socket is seen at a write
                consumer.connection.default_channel.basic_publish(
                    amqp.Message("x"), exchange="", routing_key="nowhere"
                )
        assert not link.alive(noted)

        consumer.connection = Connection(RABBITMQ_URL, heartbeat=0)
        consumer.connection.connect()
        assert link.alive(link.current())
        assert not link.alive(noted)  # replaced: the old one's messages cannot be acked
    finally:
        consumer.connection.release()
        noted.release()
