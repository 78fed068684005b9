"""What the tests share: waiting for a condition, a pika client of the
response protocol, requests and the answers they expect, a real web front,
its WebSocket and its metrics.

The process runner, the SSE client, the port finder and the broker clean-up
are the scripts' and the benchmarks' too: they live in
:mod:`chatqueue_testing.harness` and are re-exported here, so tests import
everything from ``tests.support``. Fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import psutil
import websocket
from pika.adapters.blocking_connection import BlockingChannel
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

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
    rabbitmqctl,
    read_sse,
    wait_for_consumer,
    wait_for_http,
)
from chatqueue_testing.rabbitnode import RabbitNode
from devllm.answers import reply_tokens
from devllm.testing import DevLLM

__all__ = [
    "BIN",
    "PROMPT",
    "RABBITMQ_URL",
    "ROOT",
    "RUN",
    "TOKENS",
    "Answer",
    "Broker",
    "Event",
    "EventStream",
    "PrivateStack",
    "Process",
    "Received",
    "Samples",
    "SseParser",
    "Web",
    "WebFactory",
    "WorkerFactory",
    "about",
    "ask",
    "assert_broken_after",
    "assert_protocol",
    "chat",
    "client_of",
    "collect",
    "connections_of",
    "content_of",
    "declare_response_queues",
    "delete_queues",
    "environ",
    "error_of",
    "expected",
    "fetch",
    "free_port",
    "holds_for",
    "isolated",
    "new_uid",
    "processes",
    "procfile_command",
    "queue_names",
    "read_in_background",
    "read_sse",
    "receive_all",
    "requests_for",
    "scrape",
    "stop_webs",
    "stream",
    "submit",
    "tag",
    "task_events",
    "value",
    "wait_dead_letter",
    "wait_for_consumer",
    "wait_for_http",
    "wait_until",
    "ws_request",
    "ws_url",
]

T = TypeVar("T")

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/")
# This test run's tag: its queue names and worker host names carry it, so runs
# never see each other's messages.
RUN = uuid.uuid4().hex[:8]
# The development LLM's answer length in the tests (the ``llm`` fixture).
TOKENS = 12
# The prompt of the tests that make the LLM misbehave.
PROMPT = "Tell me a joke."


def new_uid() -> str:
    return str(uuid.uuid4())


def tag() -> str:
    """A short random tag, to tell this test's requests in the LLM's log."""
    return uuid.uuid4().hex[:8]


# --- waiting ------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T],
    timeout: float = 10,
    message: str | Callable[[], str] = "",
    *,
    interval: float = 0.05,
) -> T:
    """Call ``condition()`` every ``interval`` seconds until it returns
    something true, and return that. After ``timeout`` seconds, raise
    AssertionError naming the condition (its source), its last value and
    ``message`` (called first when it is a function: a process's log, say)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(
        f"not within {timeout:g} s: {_source_of(condition)} (last: {result!r})" + _detail(message)
    )


def holds_for(
    condition: Callable[[], object],
    seconds: float,
    message: str | Callable[[], str] = "",
    *,
    interval: float = 0.05,
) -> None:
    """Check ``condition()`` every ``interval`` seconds for ``seconds``
    seconds, and raise AssertionError as soon as it is false. For what must
    not happen within a time the behaviour under test sets (a wait that must
    not end before its timeout, a retry that must not come before its pause):
    a failure shows at once, a pass takes ``seconds``."""
    began = time.monotonic()
    while True:
        if not condition():
            took = time.monotonic() - began
            raise AssertionError(
                f"false after {took:.2f} s of {seconds:g}: {_source_of(condition)}"
                + _detail(message)
            )
        if time.monotonic() - began >= seconds:
            return
        time.sleep(interval)


def about(what: str, *sources: Process | Web) -> Callable[[], str]:
    """A message for :func:`wait_until`: what the wait was for, and the end of
    the logs of ``sources`` (processes or web fronts), read when it fails."""

    def message() -> str:
        logs = [
            f"--- {source.process.name if isinstance(source, Web) else source.name}:\n"
            f"{source.output()[-3000:]}"
            for source in sources
        ]
        return "\n".join([what, *logs])

    return message


def _source_of(condition: Callable[..., object]) -> str:
    try:
        source = inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)
    return source if len(source) <= 300 else source[:300] + "..."


def _detail(message: str | Callable[[], str]) -> str:
    text = message() if callable(message) else message
    return f"\n{text}" if text else ""


# --- the response protocol over pika ------------------------------------------------------


@dataclass
class Received:
    body: bytes
    properties: pika.BasicProperties
    at: float = field(default_factory=time.monotonic)  # when it was read

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
        wait_until(lambda: self.queue_exists(name), timeout, f"queue {name} was never declared")

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

    def consumer_count(self, name: str) -> int:
        channel = self.connection.channel()
        ok = channel.queue_declare(queue=name, passive=True)
        channel.close()
        return int(ok.method.consumer_count)

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


def expected(prompt: str, n: int = TOKENS) -> str:
    """The development LLM's answer to one user message ``prompt``, ``n`` tokens long."""
    return "".join(reply_tokens([{"role": "user", "content": prompt}], n))


def chat(prompt: str, **fields: Any) -> dict[str, Any]:
    """A request body of one user message, with ``fields`` (model, uid, ...)."""
    return {"messages": [{"role": "user", "content": prompt}], **fields}


def requests_for(llm: DevLLM, model: str) -> int:
    """How many times the LLM was asked for ``model`` (of its last requests)."""
    return sum(1 for r in llm.stats()["last_requests"] if r.get("model") == model)


def assert_protocol(answer: Answer, uid: str) -> None:
    """Order, seq, properties, ids and the closing [DONE] of a streamed answer."""
    messages = answer.messages
    assert messages, "no answer"
    assert [m.seq for m in messages] == list(range(len(messages)))
    assert messages[-1].body == b"[DONE]"
    assert messages[-1].kind == "done"
    assert messages[-1].properties.content_type == "text/plain"
    for m in messages:
        assert m.properties.correlation_id == uid
    chunks = messages[:-1]
    assert all(m.kind == "chunk" for m in chunks), [m.kind for m in chunks]
    assert all(m.properties.content_type == "application/json" for m in chunks)
    payloads = [m.json for m in chunks]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["id"] for p in payloads}) == 1
    assert len({p["created"] for p in payloads}) == 1
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]]
    assert finishes[-1] in ("stop", "length")
    assert all(f is None for f in finishes[:-1])


def ask(broker: Broker, model: str, **extra: Any) -> tuple[str, Answer]:
    """Publish :data:`PROMPT` for ``model``; its uid and its answer."""
    uid = new_uid()
    broker.publish({"uid": uid, "model": model, **chat(PROMPT), **extra})
    return uid, broker.answer(uid, timeout=40)


def assert_broken_after(answer: Answer, tokens: int, code: str, status: int) -> None:
    """``answer`` is the first ``tokens`` tokens of :data:`PROMPT`'s answer,
    then an error ``code`` (``status``) and ``[DONE]``."""
    kinds = [m.kind for m in answer.messages]
    assert kinds[-2:] == ["error", "done"]
    assert set(kinds[:-2]) == {"chunk"}
    assert [m.seq for m in answer.messages] == list(range(len(answer.messages)))
    full = reply_tokens([{"role": "user", "content": PROMPT}], TOKENS)
    assert answer.content == "".join(full[:tokens])
    error = answer.messages[-2]
    assert error.json["error"]["code"] == code
    assert error.properties.headers["status"] == status


def wait_dead_letter(
    broker: Broker, match: Callable[[Received], bool], timeout: float = 20
) -> Received:
    """The dead-lettered message that ``match`` picks (others are left alone)."""
    queue = broker.env["CHATQUEUE_NAMESPACE"] + ".dead-letter"

    def find() -> Received | None:
        channel = broker.connection.channel()
        try:
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    return None
                message = Received(body, properties)
                if match(message):
                    channel.basic_ack(method.delivery_tag)
                    return message
        finally:
            channel.close()  # unacked messages go back for other tests

    return wait_until(find, timeout, f"no such dead letter in {queue}", interval=0.1)


def isolated(
    worker_env: Mapping[str, str], names: Mapping[str, str], suffix: str
) -> dict[str, str]:
    """An input queue and namespace of their own: no other worker takes these."""
    return {
        **worker_env,
        "RABBITMQ_QUEUE": f"{names['RABBITMQ_QUEUE']}-{suffix}",
        "CHATQUEUE_NAMESPACE": f"{names['CHATQUEUE_NAMESPACE']}-{suffix}",
    }


def deployment(
    worker_env: Mapping[str, str], names: Mapping[str, str], llm: DevLLM, name: str, **env: str
) -> dict[str, str]:
    """The settings of a deployment of a test's own (names, upstream ``llm``), ``env`` on top."""
    return {
        **isolated(worker_env, names, f"{name}-{new_uid()[:6]}"),
        "OPENAI_URL": llm.base_url,
        **env,
    }


def send(broker: Broker, bodies: list[dict[str, Any]]) -> list[str]:
    """Publish each body with a fresh uid, its response queue declared first; the uids."""
    uids = [new_uid() for _ in bodies]
    declare_response_queues(broker, uids, 120)
    for uid, body in zip(uids, bodies, strict=True):
        broker.publish({**body, "uid": uid})
    return uids


@contextmanager
def client_of(env: dict[str, str]) -> Iterator[Broker]:
    """A pika client on ``env``'s names; its input queue is deleted afterwards."""
    client = Broker(env["RABBITMQ_URL"], env)
    try:
        yield client
    finally:
        client.channel.queue_delete(env["RABBITMQ_QUEUE"])
        client.close()


def queue_names(prefix: str) -> list[str]:
    """The queues of the shared broker whose names begin with ``prefix``,
    listed by ``rabbitmqctl`` (a passive declare would count as a use of the
    queue, and put off its ``x-expires``)."""
    listed = rabbitmqctl("list_queues", "name", "--no-table-headers", timeout=60).split()
    return [q for q in listed if q.startswith(prefix)]


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


def submit(web: Web, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    """``POST /v1/chat/completions``: 202 and ``queued``; the uid."""
    status, _, raw = fetch("POST", web.url + "/v1/chat/completions", body, headers)
    assert status == 202, raw
    answer = json.loads(raw)
    assert answer["status"] == "queued"
    return str(answer["uid"])


def stream(web: Web, uid: str, **kwargs: Any) -> EventStream:
    """``GET /v1/chat/response?uid=`` as Server-Sent Events (see :func:`read_sse`)."""
    return read_sse(f"{web.url}/v1/chat/response?uid={urllib.parse.quote(uid)}", **kwargs)


def error_of(raw: bytes) -> dict[str, Any]:
    """The error object of an error answer's body, checked for its shape."""
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    assert {"message", "type", "code", "param"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


def read_in_background(
    web: Web, uid: str
) -> tuple[threading.Event, list[EventStream], threading.Thread]:
    """Read ``uid`` in a thread; the event is set once three events came."""
    started = threading.Event()
    first: list[EventStream] = []

    def seen_three(sse: EventStream) -> bool:
        if len(sse.events) >= 3:
            started.set()
        return False

    reader = threading.Thread(
        target=lambda: first.append(stream(web, uid, until=seen_three, timeout=60))
    )
    reader.start()
    return started, first, reader


# --- the WebSocket ------------------------------------------------------------------------


def ws_url(web: Web, query: str = "") -> str:
    return web.url.replace("http://", "ws://") + "/v1/chat/ws" + query


def ws_request(prompt: str, **fields: Any) -> str:
    """A WebSocket frame asking ``prompt``, with ``fields``."""
    return json.dumps(chat(prompt, **fields))


def receive_all(ws: websocket.WebSocket) -> list[str]:
    """The frames up to and with ``[DONE]``."""
    frames = []
    while True:
        frame = ws.recv()
        assert isinstance(frame, str)
        frames.append(frame)
        if frame == "[DONE]":
            return frames


def content_of(frames: list[str]) -> str:
    """The text of the chunks in ``frames`` (the last frame is ``[DONE]``)."""
    chunks = [json.loads(f) for f in frames[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# --- the metrics ----------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(web: Web, headers: dict[str, str] | None = None) -> Samples:
    """``GET /metrics``, parsed with prometheus_client's parser."""
    status, got, raw = fetch("GET", web.url + "/metrics", headers=headers)
    assert status == 200, raw
    assert got["Content-Type"] == CONTENT_TYPE_LATEST, got
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(raw.decode())
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def processes(samples: Samples) -> dict[str, int]:
    """``chatqueue_processes`` by role: the processes that report."""
    return {
        dict(labels)["role"]: int(v)
        for (name, labels), v in samples.items()
        if name == "chatqueue_processes"
    }


# --- private brokers ----------------------------------------------------------------------


def connections_of(node: RabbitNode, pid: int, *items: str) -> list[list[str]]:
    """The ``items`` (columns of ``rabbitmqctl list_connections``: ``pid``,
    ``state``, ...) of each AMQP connection that process ``pid`` has to ``node``."""
    ports = {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == node.port
    }
    listed = node.ctl("-q", "list_connections", "--no-table-headers", "peer_port", *items)
    rows = [line.split("\t") for line in listed.splitlines()]
    return [row[1:] for row in rows if row[0].strip().isdigit() and int(row[0]) in ports]


@dataclass
class PrivateStack:
    """What the ``private_stack`` fixture started: its settings, worker and web front."""

    env: dict[str, str]
    worker: Process
    front: Web | None

    @property
    def web(self) -> Web:
        assert self.front is not None, "started with web=False"
        return self.front


# Fixtures that start processes (tests/conftest.py): ``start_worker(name, env, **extra)``
# and ``start_web(name, env, **extra)``.
WorkerFactory = Callable[..., Process]
WebFactory = Callable[..., Web]
