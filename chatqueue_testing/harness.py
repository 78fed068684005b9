"""Processes, HTTP and the broker, as the tests, the scripts and the benchmarks use them.

- processes: :func:`procfile_command` (a Procfile line as argv, with this
  venv's executables), :class:`Process` (a child with its output in a file),
  :func:`stop_all`, :func:`wait_for_consumer` and :func:`wait_for_http`
  (until it serves), :func:`environ` (this environment without Celery's and
  the LLM's variables);
- HTTP: :func:`free_port`, :func:`fetch` (one plain request), Server-Sent
  Events with :class:`SseParser` (line by line, for any reader) and
  :func:`read_sse` (a whole stream with ``http.client``);
- the broker: :func:`delete_queues` and :func:`rabbitmqctl`.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1


# --- processes ------------------------------------------------------------------------------


def procfile_command(name: str) -> list[str]:
    """The Procfile line ``name`` as argv, with this venv's executables."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            argv = shlex.split(command)
            exe = BIN / argv[0]
            if argv[0] == "python":
                argv[0] = sys.executable
            elif exe.exists():
                argv[0] = str(exe)
            return argv
    raise KeyError(f"no {name!r} line in {ROOT / 'Procfile'}")


def environ(**overrides: str) -> dict[str, str]:
    """This environment without Celery's and the LLM's variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "OPENAI"))}
    env.update(overrides)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Process:
    """A real process with its output in a file; :meth:`stop` ends it.

    With ``detached`` (the benchmarks) it runs in a session of its own, so a
    Ctrl-C reaches only the parent, which stops its children in order, and it
    gets SIGTERM if the parent is killed outright.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        name: str,
        *,
        detached: bool = False,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        fd, log = tempfile.mkstemp(prefix=f"cq-{name}-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=detached,
                # Only the benchmarks, which run no threads, ask for it.
                preexec_fn=_die_with_parent if detached else None,  # noqa: PLW1509
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(
                f"{self.name} exited with status {self.proc.returncode}:\n{self.output()[-4000:]}"
            )

    def children(self) -> list[int]:
        """The pids of its child processes (gunicorn's workers, say)."""
        try:
            return [child.pid for child in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        stop_all([self], timeout)

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)


def stop_all(processes: Sequence[Process], timeout: float = 15.0) -> None:
    """Stop ``processes`` together (a worker's warm shutdown takes seconds even
    when idle): SIGTERM to all, then SIGKILL to those still there after
    ``timeout`` seconds."""
    running = [p for p in processes if p.alive]
    for process in running:
        process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait(10)


def wait_for_consumer(
    url: str, queue: str, timeout: float = 60, proc: Process | None = None, consumers: int = 1
) -> None:
    """Until ``consumers`` consumers (workers' bootsteps) are on ``queue``, or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    # A failover list (``;``-separated, as RABBITMQ_URL takes it): the first node that answers.
    connection = pika.BlockingConnection([pika.URLParameters(u) for u in url.split(";")])
    try:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive:
                raise AssertionError(f"{proc.name} exited:\n{proc.output()[-4000:]}")
            channel = connection.channel()
            try:
                ok = channel.queue_declare(queue=queue, passive=True)
                channel.close()
                if ok.method.consumer_count >= consumers:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass  # not declared yet
            time.sleep(0.1)
    finally:
        connection.close()
    output = proc.output()[-4000:] if proc else ""
    raise AssertionError(f"no consumer on {queue} after {timeout} s\n{output}")


def wait_for_http(
    url: str, proc: Process, ready: Callable[[int, bytes], bool], timeout: float = 60
) -> None:
    """Until ``GET url`` answers so that ``ready(status, body)``, or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited:\n{proc.output()[-4000:]}")
        with contextlib.suppress(OSError):
            status, _, body = fetch("GET", url, timeout=2)
            if ready(status, body):
                return
        time.sleep(0.1)
    raise AssertionError(f"{proc.name} never answered {url}:\n{proc.output()[-4000:]}")


# --- HTTP and Server-Sent Events ------------------------------------------------------------


def free_port() -> int:
    """A TCP port of the loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@dataclass
class Event:
    """One Server-Sent Event, with the time (``time.monotonic``) it arrived."""

    data: str
    id: str | None
    at: float
    type: str = "message"  # its ``event:`` field; EventSource's onmessage gets "message" only

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def content(self) -> str:
        """The ``delta.content`` of a ``chat.completion.chunk`` ("" for anything else)."""
        if not self.data.startswith("{"):
            return ""
        choices = self.json.get("choices") or []
        return ((choices[0].get("delta") or {}).get("content") or "") if choices else ""


@dataclass
class Comment:
    """A comment line (``: ping``), as a keep-alive sends it."""

    text: str


class SseParser:
    """Server-Sent Events, one line at a time: :meth:`feed` returns an
    :class:`Event` when a blank line ends one, a :class:`Comment`, or None."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None
        self._type = "message"

    def feed(self, raw: bytes | str) -> Event | Comment | None:
        line = (raw.decode() if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            event = Event("\n".join(self._data), self._id, time.monotonic(), self._type)
            self._data, self._id, self._type = [], None, "message"
            return event
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            return Comment(value)
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "event":
            self._type = value
        return None


@dataclass
class EventStream:
    status: int
    headers: dict[str, str]
    opened: float = 0.0  # when the request was sent (time.monotonic)
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    body: bytes = b""
    # Events of another type than "message" (``event: queue``: a waiting
    # request's place), which EventSource passes only to their own listeners.
    others: list[Event] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(e.content for e in self.events)

    @property
    def first_content_at(self) -> float:
        """When the first content token came (NaN if none did)."""
        return next((e.at for e in self.events if e.content), math.nan)


def read_sse(
    url: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
    until: Callable[[EventStream], bool] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    on_sent: Callable[[], object] | None = None,
) -> EventStream:
    """Send ``method url`` (GET by default) and read its Server-Sent Events
    until the server ends the response, or until ``until(stream)`` holds after
    an event or a comment: then the client hangs up. ``on_sent()`` is called
    once the request is sent, before its answer is read."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = f"{parts.path}?{parts.query}" if parts.query else parts.path
    try:
        opened = time.monotonic()
        connection.request(method, path, body=body, headers=dict(headers or {}))
        if on_sent is not None:
            on_sent()
        response = connection.getresponse()
        stream = EventStream(response.status, dict(response.headers), opened)
        if response.status != 200:
            stream.body = response.read()
            return stream
        parser = SseParser()
        while raw := response.readline():
            item = parser.feed(raw)
            if item is None:
                continue
            if isinstance(item, Event):
                (stream.events if item.type == "message" else stream.others).append(item)
            else:
                stream.comments.append(item.text)
            if until is not None and until(stream):
                return stream
        return stream
    finally:
        connection.close()


# --- the broker -----------------------------------------------------------------------------


def delete_queues(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> int:
    """Delete ``queues`` and ``exchanges`` (missing ones are fine); return the number of
    queue deletions that failed."""
    failed = 0
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in sorted(set(queues)):
            try:
                channel.queue_delete(queue)
            except pika.exceptions.ChannelClosedByBroker:
                failed += 1
                channel = connection.channel()
        for exchange in exchanges:
            try:
                channel.exchange_delete(exchange)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
    finally:
        connection.close()
    return failed


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    """``rabbitmqctl -q ARGS`` (as root, on the broker's machine); its output."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise OSError("rabbitmqctl is not on the PATH")
    done = subprocess.run(
        [exe, "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise OSError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout
