"""The process commands: the bare worker command and the Procfile's flower line."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from tests.support import (
    BIN,
    RUN,
    Broker,
    Process,
    assert_protocol,
    free_port,
    isolated,
    new_uid,
    procfile_command,
    wait_for_consumer,
)


def test_the_bare_worker_command_starts_a_correct_worker(
    worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """`celery -A app worker` with no flag: the prefork pool, one stream a process."""
    env = isolated(worker_env, names, "bare")
    proc = Process(
        [str(BIN / "celery"), "-A", "app", "worker", "--hostname", f"bare-{RUN}@%h"],
        env,
        "bare-worker",
    )
    client = Broker(env["RABBITMQ_URL"], env)
    try:
        wait_for_consumer(env["RABBITMQ_URL"], env["RABBITMQ_QUEUE"], proc=proc)
        uids = [new_uid() for _ in range(4)]
        for uid in uids:
            client.publish({"uid": uid, "message": "What is the capital of France?"})
        for uid in uids:
            answer = client.answer(uid)
            assert_protocol(answer, uid)
            assert answer.content == "The capital of France is Paris."
        assert "(prefork)" in proc.output()
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()
        proc.stop()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_flower_shows_requests_as_tasks_named_by_uid(
    broker: Broker, worker: Process, worker_env: dict[str, str]
) -> None:
    port = free_port()
    argv = [*procfile_command("flower"), f"--port={port}", "--address=127.0.0.1"]
    flower = Process(argv, {**worker_env, "FLOWER_UNAUTHENTICATED_API": "true"}, "flower")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get_json(f"http://127.0.0.1:{port}/api/tasks")
                break
            except OSError:
                assert flower.proc.poll() is None, flower.output()[-3000:]
                assert time.monotonic() < deadline, flower.output()[-3000:]
                time.sleep(0.3)
        uid = new_uid()
        broker.publish({"uid": uid, "message": "Tell me a joke."})
        assert_protocol(broker.answer(uid), uid)
        deadline = time.monotonic() + 20
        while True:
            tasks = get_json(f"http://127.0.0.1:{port}/api/tasks")
            if tasks.get(uid, {}).get("state") == "SUCCESS":
                break
            assert time.monotonic() < deadline, f"flower never showed {uid}: {tasks}"
            time.sleep(0.3)
        assert tasks[uid]["name"] == "chatqueue.stream_chat"
    finally:
        flower.stop()
