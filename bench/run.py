"""The whole benchmark in one run: every figure beside its direct (LLM
alone) or peer (LiteLLM's proxy) figure, and its target.

    .venv/bin/python -m bench [--quick] [--only worker,web,peer,capacity,order] [--workers N] ...

It starts, on a RabbitMQ virtual host of the run's own (so it can count the
queues the run makes, and delete them all at the end), the development LLM,
the Procfile's ``worker`` line once per core (distinct hostnames, as the
README recommends), the Procfile's ``web`` line (``WEB_CONCURRENCY`` = one
gevent process per core, as the README recommends) and LiteLLM's proxy in a
venv of its own (installed on the first run). All run with
``CHATQUEUE_NAMESPACE`` set to the run's name.

Rows (the numbers of the final table):

1. worker: time to first token (TTFT) that chatqueue adds, sequential: a
   request published on the input queue and read on its ``response_<uid>``,
   minus the same request sent straight to the LLM (openai SDK), interleaved;
2. web: TTFT added, sequential, by the OpenAI drop-in
   (``POST /openai/v1/chat/completions``, one request) and by ``POST`` +
   ``GET /v1/chat/response`` (SSE), and by LiteLLM's proxy in the same loop;
3. worker: N streams published at once (the LLM's own first token 1 s):
   TTFT from each publish;
4. web: N SSE clients at once (``POST`` then ``GET``): POST→202 and TTFT;
5. short requests published at once, answered on ``response_<uid>`` (the
   whole path: declare, publish, read): requests/s, worker CPU per request and
   per response message (the CPU of the same burst with longer answers, less
   the short one's, over the messages it added);
6. the same to one exclusive queue of the client's (AMQP ``reply_to``);
7. queues per request on the broker, counted in the run's virtual host after
   N requests and before they are read: AMQP path, ``reply_to`` path, web path;
8. the peer, LiteLLM's proxy, beside the drop-in: sequential TTFT added;
   concurrent streams (TTFT); short non-streaming requests so many at a time
   (requests/s) and the CPU per request.

9-18. capacity and order (:mod:`bench.capacity`), each on deployments and
   development LLMs of their own: the LLM's slots never exceeded, 400
   requests at once answered whole and their makespan, the CPU of waiting,
   TTFT against the code before capacity, LiteLLM's proxy as 2 processes;
   priority and tenants jumping a line, the positions told, and the makespan
   with tiers and tenants mixed.

Ctrl-C, SIGTERM and SIGHUP stop the processes and delete the virtual host.
The machine is small and shared: read medians and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import openai
import pika.exceptions

from bench import bench_web, bench_worker, capacity
from bench.bench_web import Endpoint
from bench.bench_worker import AmqpClient, Reading
from bench.peer import LiteLLM, PeerUnavailable, install_litellm, litellm_version
from bench.tools import (
    CpuMeter,
    RunVhost,
    broker_pid,
    format_table,
    log_kinds,
    median,
    ms,
    p99,
    rss_mib,
    say,
    secs,
    sigterm_as_interrupt,
    source_state,
    uninterrupted,
)
from chatqueue_testing.harness import (
    Process,
    delete_queues,
    environ,
    free_port,
    procfile_command,
    wait_for_consumer,
    wait_for_http,
)
from config import Settings, load_settings
from devllm.testing import DevLLM

SECTIONS = ("worker", "web", "peer", "capacity", "order")
QUEUE_TTL = 300  # an unread response queue of a killed run lives no longer
BROKER_RESTARTS = 2  # a row is run again after as many broker restarts


@dataclass(frozen=True)
class Plan:
    """How much of each measure a run does, and the development LLM's model strings."""

    ttft_samples: int = 200
    ttft_warmup: int = 20
    burst: int = 1000  # rows 3 and 4
    burst_tokens: int = 10
    burst_delay: float = 1.0  # the LLM's own first token, and each next one
    short: int = 2000  # rows 5 and 6
    queue_sample: int = 100  # row 7, web path
    peer_streams: int = 500
    peer_requests: int = 1000
    peer_at_a_time: int = 100
    timeout: float = 300

    ttft_model = "bench;first_delay=0;delay=0.001;tokens=5"
    ttft_tokens = 5
    short_model = "bench;first_delay=0;delay=0;tokens=5"
    short_tokens = 5
    # Row 5's cost of one more message: the same burst with this many tokens.
    long_tokens = 45

    @property
    def long_model(self) -> str:
        return f"bench;first_delay=0;delay=0;tokens={self.long_tokens}"

    @property
    def burst_model(self) -> str:
        return f"bench;first_delay=0;delay={self.burst_delay};tokens={self.burst_tokens}"


FULL = Plan()
QUICK = Plan(
    ttft_samples=40,
    ttft_warmup=5,
    burst=150,
    burst_tokens=5,
    short=300,
    queue_sample=20,
    peer_streams=100,
    peer_requests=200,
    peer_at_a_time=50,
    timeout=120,
)


@dataclass
class Row:
    """One line of the final table."""

    number: int
    measure: str
    figure: str
    beside: str
    target: str = ""
    verdict: str = ""


def verdict(*ok: bool | None) -> str:
    if any(o is None for o in ok):
        return "n/a"
    return "met" if all(ok) else "NOT met"


def at_most(value: float, limit: float) -> bool | None:
    return None if math.isnan(value) else value <= limit


def at_least(value: float, limit: float) -> bool | None:
    return None if math.isnan(value) else value >= limit


def pair(values: Sequence[float], fmt: Callable[[float], str] = ms) -> str:
    """``"median / p99"``."""
    return f"{fmt(median(values))} / {fmt(p99(values))}"


def minus(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


class Bench:
    """The processes of one run, its measures, and its clean-up."""

    def __init__(self, plan: Plan, sections: Sequence[str], workers: int, webs: int) -> None:
        self.plan = plan
        self.sections = set(sections)
        self.n_workers = workers
        self.n_webs = webs
        self.run = f"bench-{uuid.uuid4().hex[:8]}"
        self.base_url = load_settings().rabbitmq_url
        self.vhost = RunVhost(self.base_url, self.run)
        self.url = self.base_url
        self.no_count = ""  # why queues cannot be counted, if they cannot
        self.port = free_port()
        self.env = environ(
            RABBITMQ_QUEUE=f"{self.run}-input",
            RESPONSE_QUEUE_PREFIX=f"{self.run}-response_",
            CHATQUEUE_NAMESPACE=self.run,
            RESPONSE_QUEUE_TTL=str(QUEUE_TTL),
            OPENAI_MODEL="bench",
            LOG_LEVEL="warning",
            PORT=str(self.port),
            WEB_CONCURRENCY=str(webs),
        )
        self.settings: Settings = load_settings(self.env)
        self.rows: list[Row] = []
        self.log_lines: Counter[str] = Counter()
        self.dev: DevLLM | None = None
        self.workers: list[Process] = []
        self.web: Process | None = None
        self.peer: LiteLLM | None = None
        self.peer_reason = ""
        self.client: AmqpClient | None = None
        self.direct_rate = math.nan
        self.web_ttft: dict[str, list[float]] = {}

    # --- processes ------------------------------------------------------------------------

    def start(self) -> None:
        say(f"run {self.run}; code under test: {source_state()}; {os.cpu_count()} cores")
        try:
            self.vhost.create()
            self.url = self.vhost.url
            say(f"RabbitMQ: virtual host {self.run!r} of the run's own (deleted at the end)")
        except OSError as exc:
            self.no_count = f"no virtual host of the run's own ({exc}): queues not counted"
            say(f"RabbitMQ: {self.no_count}")
        self.env["RABBITMQ_URL"] = self.url
        self.settings = load_settings(self.env)
        self.dev = DevLLM().start()
        self.env["OPENAI_URL"] = self.dev.base_url
        self.llm = openai.OpenAI(base_url=self.dev.base_url, api_key="bench", max_retries=0)
        argv = procfile_command("worker")
        for i in range(self.n_workers):
            hostname = f"{self.run}-{i}@%h"
            self.workers.append(
                Process([*argv, "--hostname", hostname], self.env, f"worker{i}", detached=True)
            )
        wait_for_consumer(
            self.url, self.settings.rabbitmq_queue, 90, self.workers[0], self.n_workers
        )
        say(
            f"workers: {self.n_workers} processes of the Procfile's worker line, as the README "
            f"recommends (one per core), distinct hostnames: {' '.join(argv[1:])} --hostname ..."
        )
        if self.sections & {"web", "peer"}:
            self.web = web = self.start_web()
            deadline = time.monotonic() + 30
            while len(web.children()) < self.n_webs and time.monotonic() < deadline:
                time.sleep(0.1)
            say(
                f"web: the Procfile's web line ({' '.join(web.argv)}) with WEB_CONCURRENCY="
                f"{self.n_webs} (one gevent process per core, as the README recommends), "
                f"port {self.port}"
            )
            self.start_peer()
        self.client = AmqpClient(self.url, self.settings, self.workers)
        say(f"dev LLM at {self.dev.base_url}")

    def start_web(self, tries: int = 3) -> Process:
        """The Procfile's web line on a free port (another one if that is taken by then)."""
        for attempt in range(1, tries + 1):
            self.port = free_port()
            self.env["PORT"] = str(self.port)
            web = Process(procfile_command("web"), self.env, "web", detached=True)
            try:
                wait_for_http(f"{self.web_url}/ping", web, lambda _, body: body == b"pong")
                return web
            except AssertionError:
                web.stop()
                if attempt == tries or "Address already in use" not in web.output():
                    raise
        raise AssertionError("unreachable")

    def start_peer(self) -> None:
        assert self.dev is not None
        try:
            exe = install_litellm()
            models = [self.plan.ttft_model, self.plan.burst_model, self.plan.short_model]
            self.peer = LiteLLM(self.dev.base_url, models, self.run)
            self.peer.start(exe)
            say(
                f"peer: LiteLLM {litellm_version()} proxy, one worker, no database, "
                f"at {self.peer.url}"
            )
        except PeerUnavailable as exc:
            self.peer_reason = str(exc)
            say(f"peer: SKIPPED: {self.peer_reason}")
            if self.peer is not None:
                self.peer.stop()
                self.peer = None

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check_alive(self) -> None:
        for process in [*self.workers, *([self.web] if self.web else [])]:
            process.check_alive()

    def meter(self) -> CpuMeter:
        assert self.dev is not None
        groups: dict[str, list[int | None]] = {
            "workers": [w.pid for w in self.workers],
            "web": list(self.web.children()) if self.web else [],
            "LiteLLM": self.peer.pids() if self.peer else [],
            "dev LLM": [self.dev.pid],
            "rabbitmq (shared)": [broker_pid(self.base_url)],
            "bench client": [os.getpid()],
        }
        return CpuMeter(groups)

    def reconnect(self, timeout: float = 300) -> None:
        """After a broker restart: a new client once the workers consume again."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_for_consumer(
                    self.url, self.settings.rabbitmq_queue, 60, self.workers[0], self.n_workers
                )
                break
            except (AssertionError, pika.exceptions.AMQPConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        self.client = AmqpClient(self.url, self.settings, self.workers)

    def count_queues(self) -> int | None:
        if self.no_count:
            return None
        return len(self.vhost.queues())

    def close(self) -> None:
        with uninterrupted():
            say("\ncleaning up...")
            steps: list[tuple[str, Callable[[], object]]] = []
            if self.client is not None:
                steps.append(("closing the client", self.client.close))
            if self.peer is not None:
                steps.append(("stopping LiteLLM", self.peer.stop))
            for process in [*([self.web] if self.web else []), *self.workers]:
                steps.append((f"stopping {process.name}", process.stop))
            if self.dev is not None:
                steps.append(("stopping the dev LLM", self.dev.stop))
            if self.vhost.created:
                steps.append((f"deleting the virtual host {self.run}", self.vhost.delete))
            else:
                s = self.settings
                queues = [s.rabbitmq_queue, s.task_queue, s.dead_letter_queue]
                steps.append(
                    (
                        "deleting the queues",
                        lambda: delete_queues(self.url, queues, [s.cancel_exchange]),
                    )
                )
            for what, step in steps:
                try:
                    step()
                except Exception as exc:
                    say(f"  {what}: {exc!r}")
            processes = [*([self.web] if self.web else []), *self.workers]
            self.log_lines = log_kinds(processes)
            for process in processes:
                if process.proc.returncode in (0, -15):
                    process.remove_log()
                else:
                    say(
                        f"  {process.name} exited {process.proc.returncode}: log {process.log_path}"
                    )

    # --- the measures ---------------------------------------------------------------------

    def direct(self) -> None:
        """The LLM alone: non-streaming requests so many at a time (beside rows 5, 6, 8)."""
        assert self.dev is not None
        plan = self.plan
        result = bench_web.openai_requests(
            Endpoint("127.0.0.1", self.dev.port, "/v1/chat/completions"),
            plan.peer_requests,
            at_a_time=plan.peer_at_a_time,
            model=plan.short_model,
            tokens=plan.short_tokens,
            timeout=plan.timeout,
        )
        self.direct_rate = result.completed / result.wall
        say(
            f"\n0. the dev LLM alone: {plan.peer_requests} short non-streaming requests, "
            f"{plan.peer_at_a_time} at a time: {self.direct_rate:.0f} req/s"
        )

    def worker_ttft(self) -> None:
        assert self.client is not None
        plan = self.plan
        say(
            f"\n1. worker: TTFT, {plan.ttft_samples} sequential samples each way, "
            f"{plan.ttft_model!r}"
        )
        result = bench_worker.measure_ttft(
            self.client,
            self.llm,
            model=plan.ttft_model,
            tokens=plan.ttft_tokens,
            samples=plan.ttft_samples,
            warmup=plan.ttft_warmup,
        )
        added = result.added
        say(f"  direct {pair(result.direct)}; chatqueue {pair(result.chatqueue)}")
        say(f"  added {pair(added)}")
        self.rows.append(
            Row(
                1,
                "worker: TTFT added, sequential (median / p99)",
                pair(added),
                f"direct {pair(result.direct)}",
                "<= 3 ms median",
                verdict(at_most(median(added), 0.003)),
            )
        )

    def web_and_peer_ttft(self) -> None:
        assert self.dev is not None
        plan = self.plan
        llm = self.dev.base_url + "/chat/completions"
        paths: dict[str, Callable[[str, str], float]] = {
            "direct": partial(bench_web.sse_ttft, llm, model=plan.ttft_model),
            "drop-in": partial(
                bench_web.sse_ttft,
                self.web_url + "/openai/v1/chat/completions",
                model=plan.ttft_model,
            ),
            "POST+GET": partial(bench_web.two_steps_ttft, self.web_url, model=plan.ttft_model),
        }
        if self.peer is not None:
            paths["LiteLLM"] = partial(
                bench_web.sse_ttft,
                self.peer.url + "/v1/chat/completions",
                model=plan.ttft_model,
                headers=self.peer.headers,
            )
        say(f"\n2. web: TTFT, {plan.ttft_samples} sequential samples of each of {', '.join(paths)}")

        def call(path: Callable[..., float], prompt: str, want: str) -> float:
            return path(prompt=prompt, want=want)

        bound = {name: partial(call, path) for name, path in paths.items()}
        result = bench_web.interleaved(bound, plan.ttft_tokens, plan.ttft_samples, plan.ttft_warmup)
        direct = result["direct"]
        added = {name: minus(v, direct) for name, v in result.items() if name != "direct"}
        self.web_ttft = added
        for name, values in added.items():
            say(f"  {name}: {pair(result[name])}, added {pair(values)}")
        say(f"  direct: {pair(direct)}")
        peer = median(added["LiteLLM"]) if "LiteLLM" in added else math.nan
        beside = f"direct {pair(direct)}; LiteLLM added " + (
            pair(added["LiteLLM"]) if "LiteLLM" in added else f"n/a ({self.peer_reason[:60]})"
        )
        worst = max(median(added["drop-in"]), median(added["POST+GET"]))
        self.rows.append(
            Row(
                2,
                "web: TTFT added, drop-in; POST+GET (median / p99)",
                f"{pair(added['drop-in'])}; {pair(added['POST+GET'])}",
                beside,
                "<= 10 ms median, < LiteLLM",
                verdict(at_most(worst, 0.010), None if math.isnan(peer) else worst < peer),
            )
        )

    def worker_burst(self) -> None:
        assert self.client is not None and self.dev is not None
        plan = self.plan
        n = plan.burst
        say(f"\n3. worker: {n} streams published at once, {plan.burst_model!r}")
        readings = [Reading.new(f"burst {i}", plan.burst_tokens) for i in range(n)]
        self.dev.reset()
        cpu = self.meter()
        cpu.start()
        burst = self.client.burst(readings, plan.burst_model, plan.timeout)
        cpu.stop()
        self.check_alive()
        ttfts = burst.ttfts
        say(
            f"  completed {burst.completed}/{n} in {burst.wall:.1f} s (publishing took "
            f"{secs(burst.publish_time)}); peak LLM streams "
            f"{self.dev.stats()['peak_active_streams']}"
        )
        for line in burst.example_failures():
            say(f"    e.g. {line}")
        say(f"  TTFT {pair(ttfts, secs)}; CPU: {cpu.describe()}")
        say(f"  worker RSS now: {', '.join(f'{rss_mib(w.pid):.0f} MiB' for w in self.workers)}")
        self.rows.append(
            Row(
                3,
                f"worker: {n} streams at once, TTFT (median / p99)",
                pair(ttfts, secs) + (f" ({burst.failed} failed)" if burst.failed else ""),
                f"LLM alone {plan.burst_delay:.1f} s",
                "<= 3 s / <= 7 s",
                verdict(at_most(median(ttfts), 3), at_most(p99(ttfts), 7), burst.failed == 0),
            )
        )

    def short(self, reply_to: bool) -> None:
        assert self.client is not None
        plan = self.plan
        n = plan.short
        number, path = (
            (6, "a reply_to queue of the client's") if reply_to else (5, "response_<uid>")
        )
        say(
            f"\n{number}. {n} short requests published at once, answered on {path}, "
            f"{plan.short_model!r}"
        )
        readings = [Reading.new(f"short {i}", plan.short_tokens) for i in range(n)]
        # On the AMQP path the client declares each response_<uid> (the contract's
        # one queue a request): they count. Its own reply_to queue does not.
        counts: list[int | None] = [] if reply_to else [self.count_queues()]
        cpu = self.meter()

        def before_publish() -> None:
            if reply_to:
                counts.append(self.count_queues())
            cpu.start()

        def before_forget() -> None:
            cpu.stop()
            counts.append(self.count_queues())

        burst = self.client.burst(
            readings,
            plan.short_model,
            plan.timeout,
            reply_to=reply_to,
            before_publish=before_publish,
            before_forget=before_forget,
        )
        self.check_alive()
        rate = burst.completed / burst.wall
        worker = cpu["workers"]
        per_request = worker / n
        say(
            f"  completed {burst.completed}/{n} in {burst.wall:.2f} s: {rate:.0f} req/s; "
            f"{burst.messages} response messages"
        )
        for line in burst.example_failures():
            say(f"    e.g. {line}")
        say(f"  worker CPU {ms(per_request, 2)} a request; CPU: {cpu.describe()}")
        per_message = math.nan if reply_to else self.message_cost(worker, burst.messages)
        beside = f"LLM alone {self.direct_rate:.0f} req/s"
        failed = f" ({burst.failed} failed)" if burst.failed else ""
        if reply_to:
            self.rows.append(
                Row(
                    6,
                    "reply_to queue: req/s; worker CPU a request",
                    f"{rate:.0f} req/s; {ms(per_request, 2)}{failed}",
                    beside,
                    ">= 400 req/s",
                    verdict(at_least(rate, 400), burst.failed == 0),
                )
            )
        else:
            self.rows.append(
                Row(
                    5,
                    "response_<uid>: req/s; worker CPU a request; one more message",
                    f"{rate:.0f} req/s; {ms(per_request, 2)}; {ms(per_message, 3)}{failed}",
                    beside,
                    ">= 150 req/s; <= 5 ms; <= 0.3 ms",
                    verdict(
                        at_least(rate, 150),
                        at_most(per_request, 0.005),
                        at_most(per_message, 0.0003),
                        burst.failed == 0,
                    ),
                )
            )
        self.queue_row(
            "AMQP reply_to path" if reply_to else "AMQP path (response_<uid>)",
            counts,
            n,
            0 if reply_to else 1,
        )

    def message_cost(self, short_cpu: float, short_messages: int) -> float:
        """The worker CPU of one more response message: the short burst again with
        answers of ``long_tokens`` tokens, the difference in CPU over the
        difference in messages (what a request costs whatever its length cancels)."""
        assert self.client is not None
        plan = self.plan
        readings = [Reading.new(f"long {i}", plan.long_tokens) for i in range(plan.short)]
        cpu = self.meter()
        burst = self.client.burst(
            readings,
            plan.long_model,
            plan.timeout,
            before_publish=cpu.start,
            before_forget=cpu.stop,
        )
        self.check_alive()
        extra = burst.messages - short_messages
        cost = (cpu["workers"] - short_cpu) / max(extra, 1)
        say(
            f"  again with {plan.long_tokens} tokens: {burst.completed}/{plan.short} complete, "
            f"{burst.messages} messages; worker CPU {cpu['workers']:.2f} s against "
            f"{short_cpu:.2f} s: {ms(cost, 3)} a message more "
            f"({ms(short_cpu / max(short_messages, 1), 3)} a message averaged over the short "
            "burst, its per-request work included)"
        )
        return cost

    def queue_row(self, path: str, counts: Sequence[int | None], n: int, limit: int) -> None:
        before, after = counts[0], counts[-1]
        if before is None or after is None:
            figure, ok = f"n/a ({self.no_count})", None
        else:
            per = (after - before) / n
            figure, ok = f"{per:.2f} ({after - before} for {n} requests)", per <= limit
            say(
                f"  queues on the broker: {before} before, {after} after {n} requests, not yet read"
            )
        target = "0" if limit == 0 else ("1" if "AMQP" in path else "<= 1")
        self.rows.append(
            Row(
                7, f"queues per request, {path}", figure, f"contract: {target}", target, verdict(ok)
            )
        )

    def web_burst(self) -> None:
        assert self.dev is not None
        plan = self.plan
        n = plan.burst
        say(f"\n4. web: {n} SSE clients at once (POST, then GET), {plan.burst_model!r}")
        self.dev.reset()
        cpu = self.meter()
        cpu.start()
        result = bench_web.sse_clients(
            "127.0.0.1",
            self.port,
            n,
            model=plan.burst_model,
            tokens=plan.burst_tokens,
            timeout=plan.timeout,
        )
        cpu.stop()
        self.check_alive()
        submits, ttfts = result.submits, result.ttfts
        say(
            f"  completed {result.completed}/{n} in {result.wall:.1f} s; peak LLM streams "
            f"{self.dev.stats()['peak_active_streams']}"
        )
        for error in result.errors():
            say(f"    e.g. {error}")
        say(f"  POST->202 {pair(submits, secs)}; TTFT {pair(ttfts, secs)}; CPU: {cpu.describe()}")
        failed = f" ({result.failed} failed)" if result.failed else ""
        self.rows += [
            Row(
                4,
                f"web: {n} SSE clients at once, POST->202 (median / p99)",
                pair(submits, secs) + failed,
                "-",
                "<= 0.5 s / <= 2 s",
                verdict(
                    at_most(median(submits), 0.5), at_most(p99(submits), 2), result.failed == 0
                ),
            ),
            Row(
                4,
                f"web: {n} SSE clients at once, TTFT (median / p99)",
                pair(ttfts, secs),
                f"LLM alone {plan.burst_delay:.1f} s",
                "<= 3 s / <= 7 s",
                verdict(at_most(median(ttfts), 3), at_most(p99(ttfts), 7), result.failed == 0),
            ),
        ]

    def web_queues(self) -> None:
        assert self.dev is not None
        n = self.plan.queue_sample
        say(f"\n7. web path: {n} requests submitted (POST), counted before they are read")
        self.dev.reset()
        before = self.count_queues()
        uids = bench_web.submit_only(self.web_url, n, self.plan.short_model)
        deadline = time.monotonic() + 60
        while self.dev.stats()["streams_completed"] < n and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the worker publishes [DONE] after the LLM's last chunk
        after = self.count_queues()
        self.queue_row("web path", [before, after], n, 1)
        read = bench_web.read_answers(self.web_url, uids)
        left = self.count_queues()
        say(
            f"  read {read}/{n} answers; queues left after reading them: "
            f"{'n/a' if left is None or before is None else left - before}"
        )

    def peer_workloads(self) -> None:
        assert self.dev is not None
        plan = self.plan
        say("\n8. chatqueue's drop-in beside LiteLLM's proxy")
        targets = {
            "chatqueue drop-in": Endpoint("127.0.0.1", self.port, "/openai/v1/chat/completions")
        }
        if self.peer is not None:
            targets["LiteLLM"] = Endpoint(
                "127.0.0.1", self.peer.port, "/v1/chat/completions", self.peer.headers
            )
        streams: dict[str, bench_web.BurstResult] = {}
        rates: dict[str, float] = {}
        cpu_per: dict[str, float] = {}  # seconds a request: web + workers, or LiteLLM
        rabbit_per = math.nan
        for name, endpoint in targets.items():
            self.dev.reset()
            result = bench_web.openai_streams(
                endpoint,
                plan.peer_streams,
                model=plan.burst_model,
                tokens=plan.burst_tokens,
                timeout=plan.timeout,
            )
            streams[name] = result
            say(
                f"  {name}: {plan.peer_streams} streams at once: completed {result.completed}, "
                f"TTFT {pair(result.ttfts, secs)}, wall {result.wall:.1f} s"
            )
            for error in result.errors():
                say(f"    e.g. {error}")
            cpu = self.meter()
            cpu.start()
            result = bench_web.openai_requests(
                endpoint,
                plan.peer_requests,
                at_a_time=plan.peer_at_a_time,
                model=plan.short_model,
                tokens=plan.short_tokens,
                timeout=plan.timeout,
            )
            cpu.stop()
            rates[name] = result.completed / result.wall
            n = plan.peer_requests
            if name == "LiteLLM":
                cpu_per[name] = cpu["LiteLLM"] / n
            else:
                cpu_per[name] = (cpu["web"] + cpu["workers"]) / n
                rabbit_per = cpu["rabbitmq (shared)"] / n
            say(
                f"  {name}: {n} short requests, {plan.peer_at_a_time} at a time: completed "
                f"{result.completed}, {rates[name]:.0f} req/s; CPU: {cpu.describe()}"
            )
            for error in result.errors():
                say(f"    e.g. {error}")
        self.check_alive()
        ours, theirs = "chatqueue drop-in", "LiteLLM"
        skipped = f"n/a: {self.peer_reason}" if self.peer is None else ""

        def peer_figure(text: str) -> str:
            return skipped or f"LiteLLM {text}"

        def ahead(ok: bool) -> str:
            return "n/a" if self.peer is None else verdict(ok)

        seq = self.web_ttft.get("drop-in", [])
        seq_peer = self.web_ttft.get("LiteLLM", [])
        ttft_ours = median(streams[ours].ttfts)
        ttft_peer = median(streams[theirs].ttfts) if theirs in streams else math.nan
        self.rows += [
            Row(
                8,
                "peer: TTFT added, sequential (median)",
                f"drop-in {ms(median(seq))}",
                peer_figure(ms(median(seq_peer))),
                "below LiteLLM",
                ahead(bool(seq and seq_peer) and median(seq) < median(seq_peer)),
            ),
            Row(
                8,
                f"peer: {plan.peer_streams} concurrent streams, TTFT (median)",
                f"drop-in {secs(ttft_ours)}"
                + (f" ({streams[ours].failed} failed)" if streams[ours].failed else ""),
                peer_figure(secs(ttft_peer)),
                "below LiteLLM",
                ahead(ttft_ours < ttft_peer and streams[ours].failed == 0),
            ),
            Row(
                8,
                f"peer: {plan.peer_requests} short requests, {plan.peer_at_a_time} at a time",
                f"drop-in {rates[ours]:.0f} req/s",
                peer_figure(f"{rates.get(theirs, math.nan):.0f} req/s")
                + f"; LLM alone {self.direct_rate:.0f} req/s",
                "above LiteLLM",
                ahead(rates[ours] > rates.get(theirs, math.inf)),
            ),
            Row(
                8,
                "peer: CPU per request (of those short requests)",
                f"drop-in {ms(cpu_per[ours])} (+ RabbitMQ {ms(rabbit_per)})",
                peer_figure(ms(cpu_per.get(theirs, math.nan))),
                "below LiteLLM (web + workers)",
                ahead(cpu_per[ours] < cpu_per.get(theirs, math.inf)),
            ),
        ]


def run(bench: Bench) -> None:
    only = bench.sections
    bench.start()
    steps: list[tuple[str, Callable[[], None]]] = [("0", bench.direct)]
    if "worker" in only:
        steps.append(("1", bench.worker_ttft))
    if only & {"web", "peer"}:
        steps.append(("2", bench.web_and_peer_ttft))
    if "worker" in only:
        steps += [
            ("5", partial(bench.short, reply_to=False)),
            ("6", partial(bench.short, reply_to=True)),
            ("3", bench.worker_burst),
        ]
    if "web" in only:
        steps += [("4", bench.web_burst), ("7", bench.web_queues)]
    if "peer" in only:
        steps.append(("8", bench.peer_workloads))
    if "capacity" in only:
        steps.append(("9-14", partial(capacity.capacity, bench)))
    if "order" in only:
        steps.append(("15-18", partial(capacity.order, bench)))
    for row, step in steps:
        for attempt in range(1, BROKER_RESTARTS + 2):
            try:
                step()
                break
            except pika.exceptions.AMQPConnectionError as exc:
                # Tests on the same machine restart RabbitMQ (rabbitmqctl stop_app,
                # start_app): wait for it, and run the row again.
                if attempt > BROKER_RESTARTS:
                    raise
                say(f"  row {row}: the broker went away ({exc!r}); running the row again")
                bench.reconnect()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cores = os.cpu_count() or 1
    parser.add_argument("--quick", action="store_true", help="small numbers, a few minutes")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"{','.join(SECTIONS)} (all)")
    parser.add_argument("--workers", type=int, default=cores, help=f"worker processes ({cores})")
    parser.add_argument(
        "--web-processes", type=int, default=cores, help=f"WEB_CONCURRENCY ({cores})"
    )
    parser.add_argument("--samples", type=int, help="sequential TTFT samples (200)")
    parser.add_argument("--burst", type=int, help="streams / SSE clients at once (1000)")
    parser.add_argument("--short", type=int, help="short requests at once (2000)")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose among {SECTIONS}")
    plan = QUICK if args.quick else FULL
    chosen = {"ttft_samples": args.samples, "burst": args.burst, "short": args.short}
    plan = replace(plan, **{k: v for k, v in chosen.items() if v is not None})
    sigterm_as_interrupt()
    started = time.monotonic()
    bench = Bench(plan, sections, args.workers, args.web_processes)
    try:
        run(bench)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        bench.close()
    rows = sorted(bench.rows, key=lambda r: r.number)
    say(
        f"\nsummary of {bench.run} ({'quick' if args.quick else 'full'} run, "
        f"{time.monotonic() - started:.0f} s, {cores} cores, shared machine; "
        f"{bench.n_workers} worker processes, {bench.n_webs} web processes)"
    )
    say(
        format_table(
            [[r.number, r.measure, r.figure, r.beside, r.target, r.verdict] for r in rows],
            ["#", "measure", "chatqueue", "beside it (direct / peer)", "target", "verdict"],
        )
    )
    if bench.log_lines:
        say("\nwarning and error lines of the web and worker logs, by kind:")
        kinds = [[n, kind[:150]] for kind, n in bench.log_lines.most_common(15)]
        say(format_table(kinds, ["lines", "kind"]))
    return 0
