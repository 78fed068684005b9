"""Test helpers: real processes from the Procfile, a pika client of the response protocol."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
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


@dataclass
class Answer:
    messages: list[Received] = field(default_factory=list)

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


def wait_for_consumer(url: str, queue: str, timeout: float = 60, proc: Process | None = None) -> None:
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
