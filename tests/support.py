"""Test helpers: real processes from the Procfile, a pika client of the response protocol."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def procfile_command(name: str) -> list[str]:
    """The Procfile line ``name`` as argv, with the venv's executables."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            argv = shlex.split(command)
            exe = BIN / argv[0]
            argv[0] = str(exe) if exe.exists() else argv[0]
            if argv[0] == "python":
                argv[0] = sys.executable
            return argv
    raise KeyError(f"no {name!r} line in the Procfile")


class Process:
    """A real process with its output in a file, stopped on :meth:`stop`."""

    def __init__(self, argv: list[str], env: Mapping[str, str], name: str) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"cq-{name}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            argv, env=dict(env), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


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


def wait_for_consumer(
    url: str, queue: str, timeout: float = 60, proc: Process | None = None
) -> None:
    """Until a consumer (the worker's bootstep) is on ``queue``."""
    deadline = time.monotonic() + timeout
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.proc.poll() is not None:
                raise AssertionError(f"{proc.name} exited:\n{proc.output()[-4000:]}")
            channel = connection.channel()
            try:
                ok = channel.queue_declare(queue=queue, passive=True)
                if ok.method.consumer_count > 0:
                    return
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
            time.sleep(0.1)
    finally:
        connection.close()
    output = proc.output()[-4000:] if proc else ""
    raise AssertionError(f"no consumer on {queue} after {timeout} s\n{output}")


def environ(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "OPENAI"))}
    env.update(overrides)
    return env


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Web:
    """A real ``gunicorn web:app`` from the Procfile line, on a free port."""

    def __init__(self, env: Mapping[str, str], name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process(procfile_command("web"), {**env, "PORT": str(self.port)}, name)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise AssertionError(f"{self.process.name} exited:\n{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as response:
                    if response.read() == b"pong":
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"{self.process.name} never answered /ping:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.process.output()

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the master)."""
        pid = self.process.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children]

    def stop(self) -> None:
        """Quick shutdown (SIGQUIT): a graceful one waits for idle keep-alive connections."""
        self.process.kill(signal.SIGQUIT)
        self.process.log.close()


@dataclass
class Event:
    """One Server-Sent Event, with the time it arrived."""

    data: str
    id: str | None
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class EventStream:
    status: int
    headers: dict[str, str]
    opened: float = 0.0  # when the request was sent
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    body: bytes = b""

    @property
    def content(self) -> str:
        return "".join(
            e.json["choices"][0]["delta"].get("content") or ""
            for e in self.events
            if e.data != "[DONE]" and e.json.get("choices")
        )


def fetch(
    method: str,
    url: str,
    body: bytes | str | dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (urllib, no proxies): status, headers, body."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if isinstance(data, str):
        data = data.encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None and "Content-Type" not in request.headers:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def read_sse(
    url: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
    until: Callable[[EventStream], bool] | None = None,
) -> EventStream:
    """GET ``url`` and read its Server-Sent Events until the server ends the
    response, or until ``until(stream)`` holds after an event or a comment:
    then the client hangs up."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}", headers=dict(headers or {}))
        opened = time.monotonic()
        response = connection.getresponse()
        stream = EventStream(response.status, dict(response.headers), opened)
        if response.status != 200:
            stream.body = response.read()
            return stream
        data: list[str] = []
        event_id: str | None = None
        while True:
            raw = response.readline()
            if not raw:
                return stream
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    stream.events.append(Event("\n".join(data), event_id, time.monotonic()))
                    data, event_id = [], None
                    if until is not None and until(stream):
                        return stream
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                stream.comments.append(value)
                if until is not None and until(stream):
                    return stream
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
    finally:
        connection.close()


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
