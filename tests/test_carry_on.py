"""A worker that loses its connections to RabbitMQ mid-stream, the web front's
staying up (a worker on a node that died, a network blip between the worker
and the broker), on a RabbitMQ node of the tests' own (tests/brokers.py).

Its task messages come back to it (one worker), so its streams go on: each
writes again what it had written, marked ``replay`` (tasks/chat.py), and the
web front's readers skip what their clients have. A drop-in stream, a
WebSocket answer and an SSE stream see their whole answer, once, with no
error and no start over; the LLM is asked once. With two workers, a stream
whose task message went to the other stops waiting for it as soon as that
one says it answers it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import psutil
import websocket
from openai import OpenAI

from bench.harness import EventStream
from bench.rabbitnode import RabbitNode
from devllm.testing import DevLLM
from tasks.chat import CARRY_ON_WAIT
from tests.conftest import new_uid
from tests.support import (
    Broker,
    PrivateStack,
    Web,
    collect,
    declare_response_queues,
    wait_until,
)
from tests.test_web import chat, expected, stream, submit

pytest_plugins = ["tests.brokers"]

TOKENS = 60
MODEL = f"m;delay=0.1;tokens={TOKENS}"
MIDWAY = 15  # chunks each reader has before the worker's connections are closed


def close_connections_of(node: RabbitNode, pid: int) -> int:
    """Close on ``node`` every AMQP connection of process ``pid``, as the broker
    does to a client it lost; how many."""
    ports = {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == node.port
    }
    listed = node.ctl("-q", "list_connections", "--no-table-headers", "pid", "peer_port")
    connections = [
        connection
        for connection, _, port in (line.rpartition("\t") for line in listed.splitlines())
        if port.strip().isdigit() and int(port) in ports
    ]
    for connection in connections:
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


def test_a_stream_whose_task_message_another_worker_took_stops_waiting_for_it(
    rabbit_node: RabbitNode,
    private_stack: Callable[..., PrivateStack],
    start_worker: Any,
) -> None:
    """Two workers; one loses its connections mid-stream, and its task messages
    come back to the other (connected, it takes them first), which answers
    them again and says so (tasks/cancel.py, TakenNotices). The first
    worker's streams stop waiting for their messages within seconds, not
    after CARRY_ON_WAIT (30 s): they hold their LLM calls no longer."""
    stack = private_stack("taken", web=False)
    a, env = stack.worker, stack.env
    b = start_worker("taken-b", env=env)
    client = Broker(env["RABBITMQ_URL"], env)
    try:
        uids = [new_uid() for _ in range(10)]
        declare_response_queues(client, uids, int(env["RESPONSE_QUEUE_TTL"]))
        for i, uid in enumerate(uids):
            client.publish(
                {"uid": uid, "model": "m;delay=0.15;tokens=100", "message": f"taken {i}"}
            )
        assert wait_until(lambda: a.output().count("] received") > 0, timeout=30)
        time.sleep(2)  # every answer has begun; each lasts 15 s
        assert close_connections_of(rabbit_node, a.proc.pid) > 0

        def stopped() -> bool:
            moved = b.output().count("redelivered; the answer starts again")
            return moved > 0 and a.output().count("handed back after") >= moved

        assert wait_until(stopped, timeout=25), (a.output()[-3000:], b.output()[-3000:])
        answers = collect(client, uids, timeout=60)
    finally:
        client.close()
    log = a.output()
    assert "another worker answers its task message" in log, log[-3000:]
    assert "the task message was given back" not in log  # the 30 s wait, in vain
    assert all(answers[u].done for u in uids), [u for u in uids if not answers[u].done]
    lost = logged_at(log, "connection to RabbitMQ lost")[0]
    held = logged_at(log, "handed back after")[-1] - lost
    assert held < CARRY_ON_WAIT, held
    print(f"\nthe streams whose task message went to the other worker stopped {held:.1f} s after")


def logged_at(log: str, text: str) -> list[float]:
    """When the worker logged each line with ``text`` (seconds, its clock)."""
    return [
        datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in log.splitlines()
        if text in line and line.startswith("[")
    ]
