"""Concurrency by design: the Procfile's worker line, one process, holds 1,000
streams at once, and a burst of thousands of requests is accepted without loss."""

from __future__ import annotations

from typing import Any

import pytest

from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import Broker, collect, declare_response_queues, isolated, new_uid

# Thousands of streams through real workers: over 20 s each.
pytestmark = pytest.mark.slow


def test_one_worker_process_holds_1000_streams(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str], llm: DevLLM
) -> None:
    env = isolated(worker_env, names, "c1000")
    client = Broker(env["RABBITMQ_URL"], env)
    worker = start_worker("c1000", env=env)
    try:
        n = 1000
        uids = [new_uid() for _ in range(n)]
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        llm.reset()
        # Each stream lasts about 30 s, much longer than it takes to start
        # them all: all 1,000 are open together or the peak stays under 1,000.
        for i, uid in enumerate(uids):
            client.publish(
                {
                    "uid": uid,
                    "model": "m;delay=2;tokens=15",
                    "messages": [{"role": "user", "content": f"stream {i}"}],
                }
            )
        answers = collect(client, uids, timeout=240)
        done = [
            u for u in uids if answers[u].messages and answers[u].messages[-1].body == b"[DONE]"
        ]
        assert len(done) == n, f"{n - len(done)} streams did not finish"
        for i, uid in enumerate(uids):
            expected = "".join(reply_tokens([{"role": "user", "content": f"stream {i}"}], 15))
            assert answers[uid].in_order
            assert answers[uid].content == expected
        stats = llm.stats()
        assert stats["peak_active_streams"] >= n, stats
        assert stats["streams_completed"] >= n
        assert worker.proc.poll() is None
        errors = [line for line in worker.output().splitlines() if "ERROR" in line]
        assert errors == []
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()
        worker.stop()


def test_a_burst_of_thousands_is_accepted_without_loss(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    env = isolated(worker_env, names, "burst")
    client = Broker(env["RABBITMQ_URL"], env)
    client.channel.queue_declare(env["RABBITMQ_QUEUE"], durable=True)
    try:
        n = 3000
        uids = [new_uid() for _ in range(n)]
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        # The whole burst is waiting when the worker starts: it arrives at once.
        for uid in uids:
            client.publish(
                {
                    "uid": uid,
                    "model": "m;delay=0;tokens=3",
                    "stream": False,
                    "message": "What is the capital of France?",
                }
            )
        worker = start_worker("burst", env=env)
        answers = collect(client, uids, timeout=240)
        lost = [
            u for u in uids if not answers[u].messages or answers[u].messages[-1].body != b"[DONE]"
        ]
        assert lost == [], f"{len(lost)} of {n} lost"
        for uid in uids:
            kinds = [m.kind for m in answers[uid].messages]
            assert kinds == ["completion", "done"], kinds
        assert client.queue_length(env["RABBITMQ_QUEUE"]) == 0
        assert "RecursionError" not in worker.output()
        worker.stop()
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()
