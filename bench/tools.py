"""What the benchmarks share beyond :mod:`chatqueue_testing.harness`.

- HTTP: :func:`open_stream` (an ``asyncio`` reader for thousands of clients
  at once);
- the broker: :class:`RunVhost`, a virtual host of a run's own that counts its
  queues and goes away with all of them;
- logs: :func:`log_kinds`, the warning and error lines of processes by kind;
- figures: :func:`median` and :func:`p99` (``statistics.quantiles``),
  :class:`CpuMeter` and :func:`rss_mib` (``psutil``), :func:`format_table`;
- signals: :func:`sigterm_as_interrupt` and :func:`uninterrupted`, so that a
  benchmark stopped by Ctrl-C, SIGTERM or SIGHUP still cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import signal
import statistics
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import psutil

from chatqueue_testing.harness import ROOT, Process, rabbitmqctl

# --- HTTP -----------------------------------------------------------------------------------


async def open_stream(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, AsyncIterator[bytes], asyncio.StreamWriter]:
    """An HTTP/1.1 request with ``Connection: close`` over asyncio: the status,
    the body's lines (chunked transfer decoded) and the writer to close."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.split()
    if len(parts) < 2:
        writer.close()
        raise ConnectionError(f"no HTTP status line: {status_line!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    return int(parts[1]), _lines(reader, chunked), writer


async def _lines(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while line := await reader.readline():
            yield line
        return
    pending = b""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        pending += await reader.readexactly(size)
        await reader.readline()  # the CRLF after the chunk
        *whole, pending = pending.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if pending:
        yield pending


# --- the broker -----------------------------------------------------------------------------


class RunVhost:
    """A RabbitMQ virtual host of one run's own: every queue a run makes is in
    it, so :meth:`queues` counts them (whatever their names), and
    :meth:`delete` removes them all at once. Needs ``rabbitmqctl`` (root on the
    broker's machine); :meth:`create` says why when it cannot be had."""

    def __init__(self, base_url: str, name: str) -> None:
        self.name = name
        parts = urllib.parse.urlsplit(base_url)
        self.user = urllib.parse.unquote(parts.username or "guest")
        vhost = urllib.parse.quote(name, safe="")
        self.url = urllib.parse.urlunsplit(parts._replace(path=f"/{vhost}"))
        self.created = False

    def create(self) -> None:
        rabbitmqctl("add_vhost", self.name)
        self.created = True
        rabbitmqctl("set_permissions", "-p", self.name, self.user, ".*", ".*", ".*")

    def queues(self) -> list[str]:
        out = rabbitmqctl("list_queues", "-p", self.name, "name", "--no-table-headers")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def delete(self) -> None:
        if self.created:
            rabbitmqctl("delete_vhost", self.name, timeout=600)
            self.created = False


# --- logs -----------------------------------------------------------------------------------


def log_kinds(processes: Sequence[Process]) -> Counter[str]:
    """The warning and error lines of their logs, counted by kind: the line
    without its times, ids and numbers, after the process's name."""
    kinds: Counter[str] = Counter()
    for proc in processes:
        for line in proc.output().splitlines():
            if re.search(r"WARNING|ERROR|CRITICAL|Traceback", line):
                kinds[f"{proc.name.rstrip('0123456789')}: {_shape(line)}"] += 1
    return kinds


def _shape(line: str) -> str:
    """A log line without its times, uids, ids and numbers: its kind."""
    line = re.sub(r"^\[[^\]]*\]\s*|^\S+ \S+ ", "", line)
    line = re.sub(r"uid=[\w-]+", "uid=U", line)
    line = re.sub(r"[0-9a-f]{8,}(\.[0-9a-f]+)?|\b\d+(\.\d+)?\b", "N", line)
    return re.sub(r"\s+", " ", line).strip()


# --- figures --------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p99(values: Sequence[float]) -> float:
    """The 99th percentile (``statistics.quantiles``, inclusive)."""
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def ms(seconds: float, digits: int = 1) -> str:
    """Seconds as milliseconds: ``"12.3 ms"``."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f} ms"


def secs(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds:.2f} s"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time that process ``pid`` has used so far (0 if it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def rss_mib(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.NoSuchProcess:
        return math.nan


class CpuMeter:
    """CPU seconds used by groups of processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: Mapping[str, Iterable[int | None]]) -> None:
        self.groups = {
            name: [p for p in pids if p is not None] for name, pids in groups.items() if pids
        }
        self._start: dict[str, float] = {}
        self._started_at = 0.0
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def _now(self) -> dict[str, float]:
        return {name: sum(map(cpu_seconds, pids)) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self._started_at
        now = self._now()
        self.used = {name: now[name] - self._start[name] for name in self.groups}
        return self.used

    def __getitem__(self, name: str) -> float:
        return self.used.get(name, math.nan)

    def describe(self) -> str:
        """``"worker 1.20 s (60%), ..."``: CPU seconds, and share of one core."""
        wall = self.wall or math.nan
        return ", ".join(
            f"{name} {used:.2f} s ({100 * used / wall:.0f}%)" for name, used in self.used.items()
        )


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table, columns left-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def source_state() -> str:
    """The commit of the code under test, and the files changed since."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True)
        return done.stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except OSError:
        return "unknown (no git)"
    files = [line[3:] for line in changed if line.strip()]
    return commit + (f" + changes to {', '.join(files)}" if files else "")


# --- signals --------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def sigterm_as_interrupt() -> None:
    """Make SIGINT (even when started in the background), SIGTERM and SIGHUP raise
    KeyboardInterrupt, so ``finally`` blocks clean up."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold off SIGINT, SIGTERM and SIGHUP (a second Ctrl-C) while cleaning up."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def say(*args: object) -> None:
    """``print``, flushed, that never fails (stdout may be a closed pipe by then)."""
    with contextlib.suppress(OSError, ValueError):
        print(*args, flush=True)


def broker_pid(url: str) -> int | None:
    """The process that listens on the broker's port: the shared broker (other
    ``beam.smp`` run beside it: private nodes of tests, ``rabbitmqctl``)."""
    port = urllib.parse.urlsplit(url.split(";", maxsplit=1)[0]).port or 5672
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return int(conn.pid) if conn.pid is not None else None
    return None
