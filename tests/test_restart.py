"""A broker restart mid-stream: the worker reconnects by itself, and every
request that was accepted is answered in full."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

import pika
import pytest

from devllm.answers import reply_tokens
from tests.conftest import new_uid
from tests.support import Broker, collect, declare_response_queues
from tests.test_durability import isolated

RABBITMQCTL = shutil.which("rabbitmqctl")


def rabbitmqctl(*args: str) -> None:
    assert RABBITMQCTL
    subprocess.run([RABBITMQCTL, *args], check=True, capture_output=True, timeout=120)


def connect(env: dict[str, str], timeout: float = 60) -> Broker:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Broker(env["RABBITMQ_URL"], env)
        except pika.exceptions.AMQPConnectionError:
            assert time.monotonic() < deadline, "RabbitMQ did not come back"
            time.sleep(0.5)


@pytest.mark.skipif(RABBITMQCTL is None, reason="needs rabbitmqctl on the broker's machine")
def test_a_broker_restart_mid_stream_loses_no_accepted_request(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    env = isolated(worker_env, names, "restart")
    client = Broker(env["RABBITMQ_URL"], env)
    worker = start_worker("restart", env=env)
    prompts = [f"restart {i}" for i in range(10)]
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
        deadline = time.monotonic() + 30
        while not all(client.queue_length(client.response_queue(u)) > 1 for u in uids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client.close()
        rabbitmqctl("stop_app")
        rabbitmqctl("start_app")
        client = connect(env)
        answers = collect(client, uids, timeout=120)
        for uid, prompt in zip(uids, prompts, strict=True):
            messages = answers[uid].messages
            assert messages and messages[-1].body == b"[DONE]", (
                f"{uid} lost:\n" + (worker.output()[-3000:])
            )
            final = answers[uid].final
            assert [m.seq for m in final.messages] == list(range(len(final.messages)))
            assert final.content == "".join(reply_tokens([{"role": "user", "content": prompt}], 40))
        assert worker.proc.poll() is None  # it reconnected, it did not die
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()
        worker.stop()
