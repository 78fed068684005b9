"""What every benchmark needs: processes from the Procfile, queue names of its
own run, their removal, and figures (percentiles, memory and CPU of a process).

A benchmark builds a :class:`RunNames`, starts a :class:`~devllm.testing.DevLLM`
and the chatqueue processes it measures with :class:`ManagedProcess` (from
their Procfile lines, as ``honcho start`` runs them), and in a ``finally``
stops them and calls :func:`delete_queues` on :func:`run_queues`, so a Ctrl-C
leaves nothing behind: :func:`sigterm_as_interrupt` makes SIGTERM and
SIGHUP behave like a Ctrl-C, :func:`uninterrupted` keeps a second one from
cutting the cleanup short, and the children get SIGTERM if the benchmark is
killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pika
import pika.exceptions

from app.broker import claim_info_queue, claim_queue_name
from config import Settings, load_settings
from devllm.testing import DevLLM

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def rabbitmq_url() -> str:
    """The broker of the benchmark: ``RABBITMQ_URL``, as chatqueue reads it."""
    return load_settings().rabbitmq_url


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


def child_env(**overrides: str) -> dict[str, str]:
    """This environment without Celery's and the LLM's variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "OPENAI"))}
    env.update(overrides)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the benchmark dies (Linux), so a
    benchmark killed outright leaves no process behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ManagedProcess:
    """A child process with its output in a temporary file; :meth:`stop` ends it.

    It runs in a session of its own, so a Ctrl-C reaches only the benchmark,
    which then stops its children in order.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], name: str) -> None:
        self.name = name
        self.argv = list(argv)
        fd, log = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=dict(env),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # The benchmark runs no threads: preexec_fn is safe here.
                preexec_fn=_die_with_parent,  # noqa: PLW1509
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

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)


def start_worker(env: Mapping[str, str], hostname: str, timeout: float = 60.0) -> ManagedProcess:
    """The Procfile's ``worker`` line (plus ``--hostname``), once it consumes its input queue."""
    argv = [*procfile_command("worker"), "--hostname", hostname]
    worker = ManagedProcess(argv, env, "worker")
    try:
        wait_for_consumer(env["RABBITMQ_URL"], env["RABBITMQ_QUEUE"], worker, timeout)
    except BaseException:
        worker.stop()
        raise
    return worker


def wait_for_consumer(url: str, queue: str, process: ManagedProcess, timeout: float) -> None:
    """Until a consumer is on ``queue`` (or ``process`` exits, or ``timeout``)."""
    deadline = time.monotonic() + timeout
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        while time.monotonic() < deadline:
            process.check_alive()
            channel = connection.channel()
            try:
                ok = channel.queue_declare(queue=queue, passive=True)
                channel.close()
                if ok.method.consumer_count > 0:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass  # not declared yet
            time.sleep(0.1)
    finally:
        connection.close()
    raise RuntimeError(
        f"no consumer on {queue} after {timeout} s; {process.name}'s output:\n"
        f"{process.output()[-4000:]}"
    )


def devllm_pid(dev: DevLLM) -> int | None:
    """The pid of a running :class:`~devllm.testing.DevLLM` (which keeps it private)."""
    process = getattr(dev, "_process", None)
    return None if process is None else int(process.pid)


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


# --- queue names ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunNames:
    """Queue names of one benchmark run, so runs never see each other's messages.

    :meth:`env` points chatqueue's processes at them; the names chatqueue
    derives from those (response queues, claims, its task queue...) are read
    from its :class:`~config.Settings`, see :func:`run_queues`.
    """

    run: str

    @classmethod
    def new(cls, kind: str) -> RunNames:
        return cls(f"bench-{kind}-{uuid.uuid4().hex[:8]}")

    def env(self) -> dict[str, str]:
        return {
            "RABBITMQ_QUEUE": f"{self.run}-input",
            "RESPONSE_QUEUE_PREFIX": f"{self.run}-response_",
            "CHATQUEUE_NAMESPACE": self.run,
        }


def run_queues(settings: Settings, uids: Iterable[str] = ()) -> list[str]:
    """The queues of a run: input, tasks, dead letters, and per request its
    response queue and its claim."""
    per_request = [
        q
        for uid in uids
        for q in (
            settings.response_queue(uid),
            claim_queue_name(settings, uid),
            claim_info_queue(settings, uid),
        )
    ]
    return [settings.rabbitmq_queue, settings.task_queue, settings.dead_letter_queue, *per_request]


def delete_queues(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> int:
    """Delete ``queues`` and ``exchanges`` (missing ones are fine); return the number of
    queue deletions that failed."""
    failed = 0
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
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


# --- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table: ``"12.34 ms"``."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.2f} ms"


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``: peak RSS, ``VmRSS``: RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time that process ``pid`` has used so far (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def find_pid(command_name: str) -> int | None:
    """The pid of a process whose ``comm`` is ``command_name`` (e.g. ``beam.smp``)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command_name:
                    return int(entry.name)
            except OSError:
                continue
    return None


class CpuMeter:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}
        self._started_at = 0.0
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> None:
        self._started_at = time.perf_counter()
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.wall = time.perf_counter() - self._started_at
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used

    def describe(self) -> str:
        """``"worker 1.20 s (60%), devllm ..."``: CPU seconds and share of one core."""
        wall = self.wall or math.nan
        return ", ".join(
            f"{name} {used:.2f} s ({100 * used / wall:.0f}%)" for name, used in self.used.items()
        )


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True)
    return done.stdout


def source_state() -> str:
    """The commit of the code under test, and the files changed since (``git status``)."""
    try:
        commit = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
        changed = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    except OSError:
        return "unknown (no git)"
    files = [line[3:] for line in changed if line.strip()]
    return commit + (f" + changes to {', '.join(files)}" if files else "")


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table, columns left-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class Plan:
    """How much of each measure a benchmark runs; the dev LLM's model strings."""

    ttft_samples: int
    ttft_warmup: int
    ttft_tokens: int
    streams: int
    stream_tokens: int
    stream_delay: float
    timeout: float

    @property
    def ttft_model(self) -> str:
        return f"bench;first_delay=0;delay=0.001;tokens={self.ttft_tokens}"

    @property
    def stream_model(self) -> str:
        return f"bench;first_delay=0;delay={self.stream_delay};tokens={self.stream_tokens}"
