"""At least once, from acceptance to [DONE]: a worker killed with SIGKILL while
it streams loses nothing; another worker answers each request again."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.factory import create_app
from app.request import parse_request
from app.tasknames import STREAM_CHAT
from config import load_settings
from devllm.answers import reply_tokens
from tests.support import (
    about,
    client_of,
    collect,
    declare_response_queues,
    isolated,
    new_uid,
    wait_until,
)


@pytest.mark.slow  # it kills a worker mid-stream
def test_sigkill_mid_stream_loses_no_request(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    env = isolated(worker_env, names, "kill")
    with client_of(env) as client:
        first = start_worker("doomed", env=env)
        model = "m;delay=0.3;tokens=30"  # about 9 s a stream: none ends before the kill
        prompts = [f"durable {i}" for i in range(40)]
        uids = [new_uid() for _ in prompts]
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        for uid, prompt in zip(uids, prompts, strict=True):
            client.publish(
                {"uid": uid, "model": model, "messages": [{"role": "user", "content": prompt}]}
            )
        # Wait until the first worker is streaming every one of them...
        wait_until(
            lambda: all(client.queue_length(client.response_queue(u)) > 1 for u in uids),
            30,
            about("the first worker never streamed them all", first),
            interval=0.1,
        )
        first.kill()  # ...and kill it mid-stream: SIGKILL, no goodbye.
        assert first.proc.returncode == -9
        start_worker("rescuer", env=env)
        answers = collect(client, uids, timeout=90)
        for uid, prompt in zip(uids, prompts, strict=True):
            messages = answers[uid].messages
            assert messages and messages[-1].body == b"[DONE]", f"{uid} was lost"
            # The first worker's partial stream, then the whole answer again,
            # each message of the new one marked restart, seq from 0.
            partial, again = answers[uid].split()
            assert partial.messages and not partial.done
            assert again.in_order
            assert again.content == "".join(reply_tokens([{"role": "user", "content": prompt}], 30))


def test_requests_waiting_in_the_queue_survive_a_killed_worker(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """Requests published while no worker runs, taken by one that is killed at
    once, are answered by the next: nothing accepted is lost."""
    env = isolated(worker_env, names, "backlog")
    with client_of(env) as client:
        client.channel.queue_declare(env["RABBITMQ_QUEUE"], durable=True)
        uids = [new_uid() for _ in range(300)]
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        for uid in uids:
            client.publish(
                {
                    "uid": uid,
                    "model": "m;delay=0.05;tokens=10",
                    "message": "What is the capital of France?",
                }
            )
        doomed = start_worker("doomed-backlog", env=env)
        # Let it take part of the backlog, then kill it.
        wait_until(lambda: "accepted" in doomed.output(), 30, about("it took nothing", doomed))
        doomed.kill()
        start_worker("rescuer-backlog", env=env)
        answers = collect(client, uids, timeout=90)
        lost = [
            u for u in uids if not answers[u].messages or answers[u].messages[-1].body != b"[DONE]"
        ]
        assert lost == []
        for uid in uids:
            assert answers[uid].final.in_order
            assert answers[uid].final.content == "The capital of France is Paris."


def test_a_redelivered_request_is_answered_once_from_the_start(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """An input message given back unacknowledged was never handed off (the
    hand-off and the ack are one transaction): it is answered once, as a first
    answer, not a restart."""
    env = isolated(worker_env, names, "redelivered")
    with client_of(env) as client:
        client.channel.queue_declare(env["RABBITMQ_QUEUE"], durable=True)
        uid = new_uid()
        client.publish({"uid": uid, "model": "m;tokens=5", "message": "Hello?"})
        taker = client.connection.channel()
        method, _, _ = taker.basic_get(env["RABBITMQ_QUEUE"], auto_ack=False)
        assert method is not None and not method.redelivered
        taker.close()  # unacknowledged: the broker gives it back, marked redelivered
        start_worker("after-redelivery", env=env)
        answer = client.answer(uid)
        assert answer.done and answer.in_order
        assert not any(m.restart for m in answer.messages)
        expected = "".join(reply_tokens([{"role": "user", "content": "Hello?"}], 5))
        assert answer.content == expected


def test_a_second_copy_of_an_answered_task_is_dropped(
    start_worker: Any, worker_env: dict[str, str], names: dict[str, str]
) -> None:
    """A task message that comes back after its answer went out (its ack was
    lost) is the same incarnation (rid): it is not answered again. The same
    uid sent again later is a new request, and is answered."""
    env = isolated(worker_env, names, "copies")
    worker = start_worker("copies", env=env)
    sender = create_app(load_settings(env))
    with client_of(env) as client:
        try:
            uid = new_uid()
            declare_response_queues(client, [uid], int(env["RESPONSE_QUEUE_TTL"]))
            request = parse_request(
                {"uid": uid, "model": "m;tokens=5", "message": "Hello?"}, default_model="m"
            )
            task = sender.tasks[STREAM_CHAT]
            kwargs = {"rid": "r1", "at": time.time()}
            task.apply_async(args=[request.to_task()], kwargs=kwargs, task_id=uid)
            assert client.answer(uid).done
            task.apply_async(args=[request.to_task()], kwargs=kwargs, task_id=uid)
            wait_until(
                lambda: f"uid={uid}: rid r1 was answered already" in worker.output(),
                20,
                about("the second copy was not dropped", worker),
            )
            assert client.queue_length(client.response_queue(uid)) == 0
            again = {"rid": "r2", "at": time.time()}
            task.apply_async(args=[request.to_task()], kwargs=again, task_id=uid)
            assert client.answer(uid).done
        finally:
            sender.close()
