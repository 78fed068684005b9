"""Soak: many SSE streams at once for minutes, through a broker restart and a web reload.

``python -m bench.soak [--streams 1000] [--minutes 10]`` runs the Procfile's
worker line (two processes) and web line (``WEB_CONCURRENCY=2``) against the
development LLM and a RabbitMQ node of its own (``chatqueue_testing/rabbitnode.py``: the
shared broker is never restarted). ``--streams`` clients each submit a
request (``POST /v1/chat/completions``), read its answer
(``GET /v1/chat/response``) to ``[DONE]``, and start the next one, until the
time is up. A third of the way in, the broker restarts (``stop_app``,
``start_app``); two thirds in, the web front reloads gracefully (``kill -HUP``
of the gunicorn master, as a deploy does). A client does what
``EventSource`` does: when its stream breaks off it reads again with
``Last-Event-ID``, and a ``503`` (RabbitMQ away) is tried again.

It prints:

- answers: accepted, complete and exactly once (one ``[DONE]``, the whole
  text after the last restart, ``id`` in order), and what became of the rest;
- how often clients resumed, and waited out a 503;
- the RSS of every process at the start, before the broker restart, 30 s
  after it, before the web reload and at the end;
- the queues on the broker before, at the end, and once the response queues'
  TTL has passed;
- the warning and error lines of the workers' and the web's logs, by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from bench.bench_web import chat_body, expected
from bench.tools import format_table, log_kinds, median, open_stream, rss_mib, say
from chatqueue_testing.harness import (
    Event,
    Process,
    SseParser,
    environ,
    free_port,
    procfile_command,
    wait_for_consumer,
    wait_for_http,
)
from chatqueue_testing.rabbitnode import RabbitNode
from config import load_settings
from devllm.testing import DevLLM

TOKENS = 40
TOKEN_DELAY = 0.5  # a 20 s answer
QUEUE_TTL = 60  # seconds: the queues left by the restarts go within the run
RETRY_PAUSE = 1.0
GIVE_UP = 180.0  # seconds a client keeps trying one answer


@dataclass
class Answer:
    """One request of a client, and what it read of its answer."""

    prompt: str
    sent: float = math.nan  # seconds into the soak
    uid: str = ""
    events: list[Event] = field(default_factory=list)
    dones: int = 0
    resumes: int = 0
    waits: int = 0  # 503s waited out
    error: str | None = None

    @property
    def last_id(self) -> str | None:
        return next((e.id for e in reversed(self.events) if e.id is not None), None)

    @property
    def whole(self) -> bool:
        """One ``[DONE]``, ids in order, and the text after the last restart."""
        if self.dones != 1 or not self.events or self.events[-1].data != "[DONE]":
            return False
        ids = [e.id for e in self.events]
        start = len(ids) - 1 - ids[::-1].index("0") if "0" in ids else 0
        tail = ids[start:]
        if tail != [str(n) for n in range(len(tail))]:
            return False
        return "".join(e.content for e in self.events[start:]) == expected(self.prompt, TOKENS)


class Soak:
    def __init__(
        self,
        streams: int,
        minutes: float,
        workers: int = 2,
        webs: int = 2,
        log_level: str = "warning",
    ) -> None:
        self.streams = streams
        self.log_level = log_level
        self.seconds = minutes * 60
        self.n_workers = workers
        self.n_webs = webs
        self.run = f"soak-{uuid.uuid4().hex[:6]}"
        self.model = f"m;delay={TOKEN_DELAY};tokens={TOKENS}"
        self.answers: list[Answer] = []
        self.submit_errors: Counter[str] = Counter()
        self.submit_error_at: dict[str, list[float]] = {}  # seconds into the soak
        self.node: RabbitNode | None = None
        self.dev: DevLLM | None = None
        self.workers: list[Process] = []
        self.web: Process | None = None
        self.rss: dict[str, dict[str, float]] = {}
        self.queues: dict[str, list[str]] = {}
        self.marks: list[tuple[float, str]] = []
        self.consumers: dict[str, dict[str, int]] = {}
        self.port = free_port()
        self.started = time.monotonic()

    # --- processes ------------------------------------------------------------------------

    def start(self) -> None:
        self.node = RabbitNode("soak").start()
        say(f"RabbitMQ: a node of the soak's own, {self.node.nodename} on port {self.node.port}")
        self.dev = DevLLM().start()
        self.env = environ(
            RABBITMQ_URL=self.node.url,
            RABBITMQ_QUEUE=f"{self.run}-input",
            CHATQUEUE_NAMESPACE=self.run,
            RESPONSE_QUEUE_TTL=str(QUEUE_TTL),
            OPENAI_URL=self.dev.base_url,
            LOG_LEVEL=self.log_level,
            PORT=str(self.port),
            WEB_CONCURRENCY=str(self.n_webs),
        )
        argv = procfile_command("worker")
        for i in range(self.n_workers):
            self.workers.append(
                Process([*argv, "--hostname", f"{self.run}-{i}@%h"], self.env, f"soak-worker{i}")
            )
        wait_for_consumer(self.node.url, self.env["RABBITMQ_QUEUE"], 90, self.workers[0])
        self.web = Process(procfile_command("web"), self.env, "soak-web")
        wait_for_http(f"http://127.0.0.1:{self.port}/ping", self.web, lambda _, b: b == b"pong", 60)
        say(
            f"{self.n_workers} workers ({' '.join(argv)}), web with WEB_CONCURRENCY={self.n_webs},"
            f" dev LLM at {self.dev.base_url}; answers of {TOKENS} tokens, {TOKEN_DELAY} s apart"
        )

    def stop(self) -> None:
        for proc in [*self.workers, *([self.web] if self.web else [])]:
            proc.stop()
        if self.dev is not None:
            self.dev.stop()
        if self.node is not None:
            self.node.stop()

    def processes(self) -> dict[str, int]:
        found: dict[str, int] = {f"worker {i}": w.pid for i, w in enumerate(self.workers)}
        if self.web is not None:
            found["web master"] = self.web.pid
            for i, pid in enumerate(sorted(self.web.children())):
                found[f"web worker {i}"] = pid
        if self.dev is not None and self.dev.pid is not None:
            found["dev LLM"] = self.dev.pid
        if self.node is not None and self.node.beam_pid is not None:
            found["RabbitMQ"] = self.node.beam_pid
        return found

    def sample(self, when: str) -> None:
        self.rss[when] = {name: rss_mib(pid) for name, pid in self.processes().items()}

    def count_consumers(self) -> dict[str, int]:
        """Consumers of the input and task queues: one each per worker process."""
        assert self.node is not None
        out = self.node.ctl("list_queues", "-q", "name", "consumers", "--no-table-headers")
        found = {}
        for line in out.splitlines():
            name, _, count = line.strip().rpartition("\t")
            if name in (self.env["RABBITMQ_QUEUE"], load_settings(self.env).task_queue):
                found[name] = int(count)
        return found

    def count_queues(self, when: str) -> None:
        assert self.node is not None
        out = self.node.ctl("list_queues", "-q", "name", "--no-table-headers")
        self.queues[when] = sorted(line.strip() for line in out.splitlines() if line.strip())

    # --- clients --------------------------------------------------------------------------

    async def submit(self, answer: Answer) -> None:
        give_up = time.monotonic() + GIVE_UP
        while True:
            try:
                status, lines, writer = await open_stream(
                    "127.0.0.1",
                    self.port,
                    "POST",
                    "/v1/chat/completions",
                    body=chat_body(answer.prompt, self.model),
                )
                body = b"".join([line async for line in lines])
                writer.close()
            except (OSError, asyncio.IncompleteReadError) as exc:
                status, body = 0, repr(exc).encode()
            if status == 202:
                answer.uid = json.loads(body)["uid"]
                return
            kind = f"{status} {_kind(body)}"
            self.submit_errors[kind] += 1
            self.submit_error_at.setdefault(kind, []).append(time.monotonic() - self.started)
            if time.monotonic() > give_up:
                raise RuntimeError(f"not accepted: {status} {body[:200]!r}")
            await asyncio.sleep(RETRY_PAUSE)

    async def read(self, answer: Answer) -> None:
        give_up = time.monotonic() + GIVE_UP
        while time.monotonic() < give_up:
            last = answer.last_id
            headers = {"Last-Event-ID": last} if last is not None else {}
            try:
                status, lines, writer = await open_stream(
                    "127.0.0.1",
                    self.port,
                    "GET",
                    f"/v1/chat/response?uid={answer.uid}",
                    headers=headers,
                )
            except OSError:
                answer.resumes += 1
                await asyncio.sleep(RETRY_PAUSE)
                continue
            try:
                if status == 503:
                    answer.waits += 1
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                if status != 200:
                    body = b"".join([line async for line in lines])
                    raise RuntimeError(f"GET {status} {_kind(body)}")
                parser = SseParser()
                async for raw in lines:
                    item = parser.feed(raw)
                    if isinstance(item, Event):
                        answer.events.append(item)
                        if item.data == "[DONE]":
                            answer.dones += 1
                            return
            except (OSError, asyncio.IncompleteReadError, ValueError):
                pass  # the connection broke: read again, as EventSource does
            finally:
                writer.close()
            answer.resumes += 1
            await asyncio.sleep(RETRY_PAUSE / 2)
        raise RuntimeError("no [DONE] within the time a client waits")

    async def client(self, n: int, end: float) -> None:
        turn = 0
        while time.monotonic() < end:
            answer = Answer(f"soak {n}.{turn}", time.monotonic() - self.started)
            self.answers.append(answer)
            turn += 1
            try:
                await self.submit(answer)
                await self.read(answer)
            except Exception as exc:
                answer.error = f"{type(exc).__name__}: {exc}"

    async def events(self, start: float) -> None:
        """The restart, the reload, and the RSS samples, at their times."""
        assert self.node is not None and self.web is not None
        await asyncio.sleep(self.seconds / 3)
        self.sample("before restart")
        self.marks.append((time.monotonic() - start, "broker restart"))
        await asyncio.to_thread(self.node.restart_app)
        self.marks.append((time.monotonic() - start, "broker back"))
        await asyncio.sleep(30)
        self.consumers["30 s after the broker came back"] = await asyncio.to_thread(
            self.count_consumers
        )
        self.sample("restart + 30 s")
        await asyncio.sleep(max(0.0, start + 2 * self.seconds / 3 - time.monotonic()))
        self.sample("before reload")
        self.marks.append((time.monotonic() - start, "web reload (HUP)"))
        os.kill(self.web.pid, signal.SIGHUP)

    async def drive(self) -> None:
        start = self.started = time.monotonic()
        end = start + self.seconds
        clients = [self.client(n, end) for n in range(self.streams)]
        await asyncio.gather(self.events(start), *clients)

    # --- report ---------------------------------------------------------------------------

    def report(self) -> None:
        accepted = [a for a in self.answers if a.uid]
        whole = [a for a in accepted if a.whole]
        twice = [a for a in accepted if a.dones > 1]
        broken = [a for a in accepted if not a.whole]
        say("\n== answers ==")
        rows = [
            ["requests sent", len(self.answers)],
            ["accepted (202)", len(accepted)],
            ["answered whole, exactly once", len(whole)],
            ["answered more than once ([DONE] twice)", len(twice)],
            ["accepted, not answered whole", len(broken)],
            ["not accepted (gave up after 503s)", len(self.answers) - len(accepted)],
            ["restarted by a worker (id 0 again)", sum(_restarted(a) for a in accepted)],
            ["streams resumed (Last-Event-ID)", sum(a.resumes > 0 for a in accepted)],
            ["reads that met a 503", sum(a.waits for a in accepted)],
        ]
        say(format_table(rows, ["", "count"]))
        if broken:
            minutes = Counter(int(a.sent // 30) * 30 for a in broken)
            say(
                "  sent at (s into the soak): "
                + ", ".join(f"{t}-{t + 30}: {c}" for t, c in sorted(minutes.items()))
            )
        for answer in broken[:5]:
            say(
                f"  not whole: {answer.uid} sent at {answer.sent:.1f} s: {answer.error} "
                f"dones={answer.dones} "
                f"ids={[e.id for e in answer.events][-6:]}"
            )
        if self.submit_errors:
            say(
                "submissions refused, by status and code: "
                + ", ".join(f"{k}: {v}" for k, v in self.submit_errors.most_common())
            )
            for kind, times in self.submit_error_at.items():
                say(f"  {kind} at (s into the soak): " + ", ".join(f"{t:.1f}" for t in times[:20]))
        say("events: " + "; ".join(f"{what} at {at:.0f} s" for at, what in self.marks))

        self.consumers.setdefault("end", self.count_consumers())
        say(f"\n== consumers (each worker process: one of each queue, {self.n_workers} in all) ==")
        for when, found in self.consumers.items():
            say(f"{when}: " + ", ".join(f"{name} {n}" for name, n in sorted(found.items())))

        say("\n== streams the broker restart cut, by worker ==")
        say(
            format_table(
                [
                    [worker.name, *(worker.output().count(words) for words in _CUT.values())]
                    for worker in self.workers
                ],
                ["worker", *_CUT],
            )
        )
        say(
            "(a worker whose Celery consumer is back first takes what the queue gives back; "
            "a stream went on whichever worker its task message came back to, and one that "
            "came back to the other worker followed it there)"
        )

        say("\n== RSS (MiB) ==")
        names = sorted({name for sample in self.rss.values() for name in sample})
        whens = list(self.rss)
        say(
            format_table(
                [[name, *(_mib(self.rss[w].get(name, math.nan)) for w in whens)] for name in names],
                ["process", *whens],
            )
        )
        say("(the web workers after the reload are new processes)")

        say("\n== queues on the broker ==")
        rows = [
            [k, len(v), sum(q.startswith("response_") for q in v), sum(_server_named(q) for q in v)]
            for k, v in self.queues.items()
        ]
        say(format_table(rows, ["when", "queues", "response_<uid>", "exclusive (amq.gen-)"]))
        say("(exclusive queues live as long as the connection of a web process)")
        first, *_, last = self.queues.values()
        if extra := sorted(q for q in set(last) - set(first) if not _server_named(q)):
            say(f"left at the end: {', '.join(extra[:10])}")

        say("\n== warning and error lines of the logs, by kind ==")
        processes = [*self.workers, *([self.web] if self.web else [])]
        kinds = log_kinds(processes)
        say(format_table([[v, k[:150]] for k, v in kinds.most_common(25)], ["lines", "kind"]))
        say("logs: " + ", ".join(str(proc.log_path) for proc in processes))
        durations = [e.at - a.events[0].at for a in whole for e in a.events[-1:] if a.events]
        say(
            f"\nmedian stream read time {median(durations):.1f} s "
            f"(the LLM takes {TOKENS * TOKEN_DELAY:.0f} s)"
        )


# What a worker logs of a stream the restart cut: column -> the line's words.
_CUT = {
    "handed back": ": handed back after ",
    "started again (redelivered)": ": redelivered; the answer starts again",
    "went on, written again": ": goes on after a lost connection",
    "came back, followed the other's": ": came back while its answer streams in another worker",
}


def _server_named(queue: str) -> bool:
    return queue.startswith("amq.gen-")


def _restarted(answer: Answer) -> bool:
    return [e.id for e in answer.events].count("0") > 1


def _kind(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return body[:80].decode("utf-8", "replace")


def _mib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--streams", type=int, default=1000, help="clients at once (1000)")
    parser.add_argument("--minutes", type=float, default=10, help="how long (10)")
    parser.add_argument(
        "--log-level",
        default="warning",
        help="LOG_LEVEL of the workers and the web (warning; info logs each request by uid)",
    )
    args = parser.parse_args(argv)
    # A socket per client, and one more while it submits.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soak = Soak(args.streams, args.minutes, log_level=args.log_level)
    try:
        soak.start()
        soak.count_queues("before")
        soak.sample("start")
        say(f"{args.streams} clients for {args.minutes:g} min ...")
        asyncio.run(soak.drive())
        soak.sample("end")
        soak.count_queues("end")
        time.sleep(QUEUE_TTL + 10)
        soak.count_queues(f"end + {QUEUE_TTL + 10} s (response queues' TTL passed)")
        soak.report()
    finally:
        soak.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
