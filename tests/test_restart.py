"""A broker restart mid-stream, on a RabbitMQ node of the tests' own
(tests/conftest.py): the worker reconnects by itself, every request that was
accepted is answered in full, and the connections it lost are a line each in
its log, not tracebacks."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import pika
import pytest
from celery.worker.consumer import consumer as celery_consumer

from app import logs
from chatqueue_testing.rabbitnode import RabbitNode
from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import (
    Broker,
    PrivateStack,
    about,
    collect,
    declare_response_queues,
    new_uid,
    wait_until,
)


def connect(env: dict[str, str], timeout: float = 60) -> Broker:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Broker(env["RABBITMQ_URL"], env)
        except pika.exceptions.AMQPConnectionError:
            assert time.monotonic() < deadline, "RabbitMQ did not come back"
            time.sleep(0.5)


@pytest.mark.slow  # it restarts a private RabbitMQ node
def test_a_broker_restart_mid_stream_loses_no_accepted_request(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    llm: DevLLM,
) -> None:
    """With one worker, every task message comes back to the process whose
    streams lost it: each stream goes on, writing again from memory what it
    had written (marked restart), and the LLM is asked once per request."""
    stack = private_stack("restart", web=False)
    env, worker = stack.env, stack.worker
    client = Broker(env["RABBITMQ_URL"], env)
    tag = new_uid()
    prompts = [f"restart {tag} {i}" for i in range(10)]
    uids = [new_uid() for _ in prompts]
    try:
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        for uid, prompt in zip(uids, prompts, strict=True):
            client.publish(
                {
                    "uid": uid,
                    "model": "m;delay=0.15;tokens=40",
                    "messages": [{"role": "user", "content": prompt}],
                },
                pika.BasicProperties(delivery_mode=2),
            )
        wait_until(
            lambda: all(client.queue_length(client.response_queue(u)) > 1 for u in uids),
            30,
            about("the worker never streamed them all", worker),
            interval=0.1,
        )
        client.close()
        rabbit_node.restart_app()
        client = connect(env)
        answers = collect(client, uids, timeout=120)
        log = worker.output()
        for uid, prompt in zip(uids, prompts, strict=True):
            messages = answers[uid].messages
            assert messages and messages[-1].body == b"[DONE]", f"{uid} lost:\n{log[-3000:]}"
            final = answers[uid].final
            assert [m.seq for m in final.messages] == list(range(len(final.messages)))
            assert final.content == "".join(reply_tokens([{"role": "user", "content": prompt}], 40))
        asked = [r for r in llm.stats()["last_requests"] if tag in json.dumps(r)]
        assert len(asked) == len(prompts), f"the LLM was asked again:\n{log[-3000:]}"
        assert log.count("goes on after a lost connection") >= len(prompts), log[-3000:]
        assert worker.proc.poll() is None  # it reconnected, it did not die
        # An expected connection loss is one line: no traceback.
        assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
        assert "CPendingDeprecationWarning" not in log  # Celery's, of a setting chatqueue sets
    finally:
        client.close()
        worker.stop()


def test_celerys_failed_immediate_ack_after_a_loss_is_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery acks at once from a task's greenlet under gevent, and logs a
    failure with its traceback: after a broker restart, one line each."""
    logs.install()
    celery_logger = celery_consumer.logger
    with caplog.at_level(logging.WARNING, logger=celery_logger.name):
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError as exc:
            celery_logger.exception("call_soon_ack immediate exec failed: %r", exc)
    (record,) = [r for r in caplog.records if "call_soon_ack" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.exc_info is None and "Traceback" not in caplog.text
