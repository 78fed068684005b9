"""A worker that loses its connections to RabbitMQ mid-stream, the web front's
staying up (a worker on a node that died, a network blip between the worker
and the broker), on a RabbitMQ node of the tests' own (tests/conftest.py).

Its task messages come back to it (one worker), so its streams go on: each
writes again what it had written, marked ``replay`` (tasks/chat.py), and the
web front's readers skip what their clients have. A drop-in stream, a
WebSocket answer and an SSE stream see their whole answer, once, with no
error and no start over; the LLM is asked once. With two workers, the task
messages that go to the other worker follow the streams that went on: the
LLM is asked once there too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import websocket
from openai import OpenAI

from chatqueue_testing.harness import EventStream
from chatqueue_testing.rabbitnode import RabbitNode
from devllm.testing import DevLLM
from tests.support import (
    Answer,
    Broker,
    PrivateStack,
    Web,
    about,
    chat,
    collect,
    connections_of,
    declare_response_queues,
    expected,
    new_uid,
    stream,
    submit,
    wait_until,
)

# Each test closes a worker's connections on a private RabbitMQ node.
pytestmark = pytest.mark.slow

TOKENS = 60
MODEL = f"m;delay=0.1;tokens={TOKENS}"
MIDWAY = 15  # chunks each reader has before the worker's connections are closed


def close_connections_of(node: RabbitNode, pid: int) -> int:
    """Close on ``node`` every AMQP connection of process ``pid``, as the broker
    does to a client it lost; how many."""
    connections = connections_of(node, pid, "pid")
    for (connection,) in connections:
        node.ctl("close_connection", connection, "closed by the test")
    return len(connections)


def read_drop_in(url: str, prompt: str, midway: threading.Barrier) -> str:
    client = OpenAI(base_url=url + "/openai/v1", api_key="unused", max_retries=0)
    messages = chat(prompt)["messages"]
    chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    text = []
    for n, chunk in enumerate(chunks):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if n == MIDWAY:
            midway.wait()
    return "".join(text)


def read_websocket(url: str, prompt: str, midway: threading.Barrier) -> str:
    ws = websocket.create_connection(url.replace("http", "ws") + "/v1/chat/ws", timeout=60)
    try:
        ws.send(json.dumps(chat(prompt, model=MODEL)))
        text = []
        n = 0
        while (frame := ws.recv()) != "[DONE]":
            body = json.loads(frame)
            assert "error" not in body, body
            if body.get("choices"):
                text.append(body["choices"][0]["delta"].get("content") or "")
            n += 1
            if n == MIDWAY:
                midway.wait()
        return "".join(text)
    finally:
        ws.close()


def read_over_sse(web: Web, prompt: str, midway: threading.Barrier) -> EventStream:
    uid = submit(web, chat(prompt, model=MODEL))
    waited: list[int] = []

    def at_midway(events: EventStream) -> bool:
        if len(events.events) >= MIDWAY and not waited:
            waited.append(midway.wait())
        return False

    return stream(web, uid, timeout=60, until=at_midway)


def test_a_worker_that_loses_its_connections_goes_on_and_no_reader_sees_it(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    llm: DevLLM,
) -> None:
    stack = private_stack("carry-on")
    web, worker = stack.web, stack.worker
    assert web is not None
    midway = threading.Barrier(4, timeout=60)
    tag = new_uid()
    prompts = {name: f"carry on {name} {tag}" for name in ("drop-in", "ws", "sse")}

    with ThreadPoolExecutor(3) as pool:
        readers = [
            pool.submit(read_drop_in, web.url, prompts["drop-in"], midway),
            pool.submit(read_websocket, web.url, prompts["ws"], midway),
            pool.submit(read_over_sse, web, prompts["sse"], midway),
        ]
        midway.wait()
        assert close_connections_of(rabbit_node, worker.proc.pid) > 0
        dropped_in, websocket_text, sse = (reader.result(timeout=120) for reader in readers)

    log = worker.output()
    assert dropped_in == expected(prompts["drop-in"], TOKENS), log[-3000:]
    assert websocket_text == expected(prompts["ws"], TOKENS), log[-3000:]
    assert sse.status == 200 and sse.events[-1].data == "[DONE]"
    ids = [int(e.id) for e in sse.events if e.id is not None]
    assert ids == list(range(len(ids))), ids  # no start over: the reader skipped the replay
    assert sse.content == expected(prompts["sse"], TOKENS)
    asked = [
        r for r in llm.stats()["last_requests"] if any(p in json.dumps(r) for p in prompts.values())
    ]
    assert len(asked) == len(prompts), "the LLM was asked again"
    assert log.count("goes on after a lost connection") >= len(prompts), log[-3000:]
    assert "Traceback" not in log


def test_a_task_message_that_comes_back_to_another_worker_follows_the_stream(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    start_worker: Any,
    llm: DevLLM,
) -> None:
    """Two workers; one loses its connections mid-stream, and its task
    messages come back to the other (connected, it takes them first). Its
    streams go on, saying so (``holding``, tasks/cancel.py), and the other
    worker follows them (``following``) instead of asking the LLM again: it
    acknowledges each task message once that stream said it ended. Every
    answer is whole, ends once, and the LLM was asked once per request."""
    stack = private_stack("follow", web=False)
    a, env = stack.worker, stack.env
    b = start_worker("follow-b", env=env)
    client = Broker(env["RABBITMQ_URL"], env)
    tag = new_uid()
    prompts = {new_uid(): f"follow {tag} {i}" for i in range(10)}
    try:
        declare_response_queues(client, list(prompts), int(env["RESPONSE_QUEUE_TTL"]))
        for uid, prompt in prompts.items():
            client.publish({"uid": uid, "model": "m;delay=0.15;tokens=100", "message": prompt})
        # Every answer has begun (each lasts 15 s).
        wait_until(
            lambda: all(client.queue_length(client.response_queue(u)) for u in prompts),
            30,
            about("not every answer began", a, b),
        )
        assert close_connections_of(rabbit_node, a.proc.pid) > 0
        answers = collect(client, list(prompts), timeout=90)
    finally:
        client.close()
    a_log, b_log = a.output(), b.output()
    followed = b_log.count("came back while its answer streams in another worker; follows it")
    assert followed > 0, (a_log[-3000:], b_log[-3000:])
    assert a_log.count("which follows this stream: it goes on here") == followed
    assert "redelivered; the answer starts again" not in b_log
    for uid, prompt in prompts.items():
        answer = answers[uid]
        assert answer.done, (uid, a_log[-3000:])
        assert [m.body for m in answer.messages].count(b"[DONE]") == 1
        # As the contract reads it: a message marked restart with seq 0
        # drops what came before (each write again after a loss is one).
        starts = [i for i, m in enumerate(answer.messages) if m.restart and m.seq == 0]
        last_run = Answer(answer.messages[starts[-1] if starts else 0 :])
        assert last_run.in_order, [m.seq for m in last_run.messages]
        assert last_run.content == expected(prompt, 100), uid
    asked = [r for r in llm.stats()["last_requests"] if tag in json.dumps(r)]
    assert len(asked) == len(prompts), "the LLM was asked again"
    print(f"\n{followed} streams went on in the worker that lost its connections, followed")
