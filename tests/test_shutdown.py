"""A worker's warm shutdown (SIGTERM): it takes no new request, lets its
streams go on for WORKER_SHUTDOWN_GRACE seconds, hands back those still
running (another worker answers them again, marked ``restart``) and exits."""

from __future__ import annotations

import signal
import time
from typing import Any

import pika
import pytest

from config import load_settings
from devllm.answers import reply_tokens
from tests.support import client_of, collect, declare_response_queues, isolated, new_uid

GRACE = 8.0


def consumers(client: Any, queue: str) -> int:
    channel = client.connection.channel()
    ok = channel.queue_declare(queue=queue, passive=True)
    channel.close()
    return int(ok.method.consumer_count)


@pytest.mark.slow  # a worker's warm shutdown and its grace: about 30 s
def test_sigterm_finishes_short_streams_and_hands_back_long_ones(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    env = {**isolated(worker_env, names, "sigterm"), "WORKER_SHUTDOWN_GRACE": str(GRACE)}
    with client_of(env) as client:
        leaving = start_worker("leaving", env=env)
        # The long ones take about 15 s, the short one about 1.5 s.
        requests = {new_uid(): ("long", "m;delay=0.25;tokens=60") for _ in range(3)}
        short = new_uid()
        requests[short] = ("short", "m;delay=0.25;tokens=6")
        prompts = {uid: f"sigterm {kind} {uid}" for uid, (kind, _) in requests.items()}
        uids = list(requests)
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        for uid, (_, model) in requests.items():
            messages = [{"role": "user", "content": prompts[uid]}]
            client.publish(
                {"uid": uid, "model": model, "messages": messages},
                pika.BasicProperties(delivery_mode=2),
            )
        deadline = time.monotonic() + 30
        while not all(client.queue_length(client.response_queue(u)) >= 1 for u in uids):
            assert time.monotonic() < deadline, "the worker never streamed them all"
            time.sleep(0.05)

        leaving.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # The intake lets go of the input queue at once; Celery cancels the
        # consumer of the task queue after its loop's next cycle (about 3 s
        # here), before the grace is over: a stream handed back goes elsewhere.
        tasks = load_settings(env).task_queue
        for queue, within in ((env["RABBITMQ_QUEUE"], 2), (tasks, GRACE - 2)):
            while consumers(client, queue) > 0:
                assert time.monotonic() - sent < within, f"{queue} still consumed after SIGTERM"
                time.sleep(0.05)
        taker = start_worker("taker", env=env)
        leaving.proc.wait(GRACE + 15)
        took = time.monotonic() - sent
        assert took < GRACE + 5, f"exited {took:.1f} s after SIGTERM:\n{leaving.output()[-3000:]}"
        assert leaving.proc.returncode == 0, leaving.output()[-3000:]

        answers = collect(client, uids, timeout=60)
        for uid, answer in answers.items():
            log = f"{uid}:\n{leaving.output()[-3000:]}\n{taker.output()[-3000:]}"
            assert answer.done, log
            # Answered once: one [DONE], and the answer that counts is whole.
            assert [m.body for m in answer.messages].count(b"[DONE]") == 1, log
            final = answer.final
            assert final.in_order, log
            messages = [{"role": "user", "content": prompts[uid]}]
            tokens = int(requests[uid][1].rpartition("=")[2])
            assert final.content == "".join(reply_tokens(messages, tokens)), log
            first, again = answer.split()
            if uid == short:
                assert not again.messages, "the short stream was not finished where it began"
            else:
                assert first.messages and not first.done, log
                assert again.messages, f"{uid} was not answered again, marked restart: {log}"
                assert f"uid={uid}: handed back" in leaving.output()
                assert f"uid={uid}: redelivered" in taker.output()
        assert "Traceback" not in leaving.output(), leaving.output()[-3000:]
