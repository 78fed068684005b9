"""Test helpers: a pika client of the response protocol, and a real web front.

The process runner, the SSE client, the port finder and the broker clean-up
are the benchmarks' too: they live in :mod:`chatqueue_testing.harness` and are
re-exported here, so tests import everything from ``tests.support``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from chatqueue_testing.harness import (
    BIN,
    ROOT,
    Event,
    EventStream,
    Process,
    SseParser,
    delete_queues,
    environ,
    fetch,
    free_port,
    procfile_command,
    read_sse,
    wait_for_consumer,
    wait_for_http,
)

__all__ = [
    "BIN",
    "ROOT",
    "Answer",
    "Broker",
    "Event",
    "EventStream",
    "Process",
    "Received",
    "SseParser",
    "Web",
    "collect",
    "declare_response_queues",
    "delete_queues",
    "environ",
    "fetch",
    "free_port",
    "procfile_command",
    "read_sse",
    "task_events",
    "wait_for_consumer",
]


@dataclass
class Received:
    body: bytes
    properties: pika.BasicProperties

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def seq(self) -> int:
        return int((self.properties.headers or {})["seq"])

    @property
    def kind(self) -> str | None:
        return self.properties.type

    @property
    def restart(self) -> bool:
        return bool((self.properties.headers or {}).get("restart"))


@dataclass
class Answer:
    messages: list[Received] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.messages) and self.messages[-1].body == b"[DONE]"

    def split(self) -> tuple[Answer, Answer]:
        """(what a first worker sent, the restarted answer that replaces it)."""
        return (
            Answer([m for m in self.messages if not m.restart]),
            Answer([m for m in self.messages if m.restart]),
        )

    @property
    def in_order(self) -> bool:
        """Whether the messages came in the order of their ``seq`` headers."""
        return [m.seq for m in self.messages] == list(range(len(self.messages)))

    @property
    def final(self) -> Answer:
        """The answer that counts: a restarted stream replaces what came before."""
        first, again = self.split()
        return again if again.messages else first

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [m.json for m in self.messages if m.kind == "chunk"]

    @property
    def content(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"]
        )

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m.json for m in self.messages if m.kind == "error"]


class Broker:
    """A pika client of chatqueue, as an application would write one."""

    def __init__(self, url: str, env: Mapping[str, str]) -> None:
        self.env = env
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel: BlockingChannel = self.connection.channel()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    @property
    def input_queue(self) -> str:
        return self.env["RABBITMQ_QUEUE"]

    def response_queue(self, uid: str) -> str:
        return self.env["RESPONSE_QUEUE_PREFIX"] + uid

    def publish(
        self, body: bytes | str | dict[str, Any], properties: pika.BasicProperties | None = None
    ) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        self.channel.basic_publish(
            exchange="", routing_key=self.input_queue, body=body, properties=properties
        )

    def queue_exists(self, name: str) -> bool:
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue=name, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False
        channel.close()
        return True

    def wait_for_queue(self, name: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue_exists(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"queue {name} was never declared")
            time.sleep(0.05)

    def read(self, queue: str, timeout: float = 30, until_done: bool = True) -> Answer:
        """Read ``queue`` until ``[DONE]`` (or ``timeout``)."""
        self.wait_for_queue(queue, timeout)
        answer = Answer()
        deadline = time.monotonic() + timeout
        for method, properties, body in self.channel.consume(
            queue, auto_ack=True, inactivity_timeout=0.2
        ):
            if method is not None:
                answer.messages.append(Received(body, properties))
                if until_done and body == b"[DONE]":
                    break
            if time.monotonic() > deadline:
                break
        self.channel.cancel()
        return answer

    def answer(self, uid: str, timeout: float = 30) -> Answer:
        return self.read(self.response_queue(uid), timeout)

    def queue_length(self, name: str) -> int:
        channel = self.connection.channel()
        ok = channel.queue_declare(queue=name, passive=True)
        channel.close()
        return int(ok.method.message_count)

    def get_all(self, name: str) -> list[Received]:
        out = []
        while True:
            method, properties, body = self.channel.basic_get(name, auto_ack=True)
            if method is None:
                return out
            out.append(Received(body, properties))


def collect(broker: Broker, uids: list[str], timeout: float) -> dict[str, Answer]:
    """Read the answers of many requests at once on one channel, until each is
    ``[DONE]`` or ``timeout``. The response queues must exist (declare them first)."""
    answers = {uid: Answer() for uid in uids}
    open_ = set(uids)
    channel = broker.connection.channel()
    channel.basic_qos(prefetch_count=1000)

    def on_message(uid: str) -> Any:
        def handle(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            answers[uid].messages.append(Received(body, properties))
            if body == b"[DONE]":
                open_.discard(uid)

        return handle

    for uid in uids:
        channel.basic_consume(broker.response_queue(uid), on_message(uid), auto_ack=True)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        broker.connection.process_data_events(time_limit=0.2)
    channel.close()
    return answers


def declare_response_queues(broker: Broker, uids: list[str], ttl: int) -> None:
    """Declare the response queues as the worker does, so reading can start first."""
    for uid in uids:
        broker.channel.queue_declare(
            broker.response_queue(uid), durable=True, arguments={"x-expires": ttl * 1000}
        )


# --- the web front ------------------------------------------------------------------------


class Web:
    """A real ``gunicorn web:app`` from the Procfile line, on a free port."""

    def __init__(self, env: Mapping[str, str], name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process(procfile_command("web"), {**env, "PORT": str(self.port)}, name)

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for_http(self.url + "/ping", self.process, lambda _, body: body == b"pong", timeout)

    def output(self) -> str:
        return self.process.output()

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the master)."""
        return self.process.children()

    def stop(self) -> None:
        """Quick shutdown (SIGQUIT): a graceful one waits for idle keep-alive connections."""
        self.process.kill(signal.SIGQUIT)


def stop_webs(servers: list[Web]) -> None:
    """Stop ``servers`` together (SIGQUIT to all, then wait): one after the
    other, the suite's few dozen took half a second each."""
    running = [server.process for server in servers if server.process.alive]
    for process in running:
        process.proc.send_signal(signal.SIGQUIT)
    for process in running:
        process.proc.wait(30)


def task_events(url: str, uid: str, send: Callable[[], object], timeout: float = 20) -> list[Any]:
    """The Celery events the workers send about ``uid`` once ``send()`` made
    its request, up to its ``task-succeeded``, read as Flower reads them."""
    from celery import Celery

    events: list[dict[str, Any]] = []
    probe = Celery(broker=url, set_as_current=False)
    with probe.connection_for_read() as connection:
        receiver = probe.events.Receiver(
            connection, handlers={"*": events.append}, node_id=f"probe-{uid}"
        )
        capture = receiver.itercapture(limit=None, timeout=timeout, wakeup=False)
        next(capture)  # consuming: the first event (a worker heartbeat) is in
        send()
        for _ in capture:
            if any(e["type"] == "task-succeeded" and e.get("uuid") == uid for e in events):
                break
    return [e for e in events if e.get("uuid") == uid]


@dataclass
class PrivateStack:
    """What :func:`private_stack` started: its settings, worker and web front."""

    env: dict[str, str]
    worker: Process
    front: Web | None

    @property
    def web(self) -> Web:
        assert self.front is not None, "started with web=False"
        return self.front


def wait_until(predicate: Any, timeout: float = 10) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
