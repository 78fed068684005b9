"""app/broker.py's one use of a py-amqp private attribute, checked against the
installed py-amqp: this fails when ``transport._read_buffer`` moves."""

from __future__ import annotations

from kombu import Connection

from app.broker import frames_waiting
from tests.conftest import RABBITMQ_URL


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
