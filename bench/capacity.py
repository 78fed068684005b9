"""Capacity and order: what the LLM is asked at once, and who waits, in which order.

Two sections of ``python -m bench`` (``--only capacity,order``), rows 9 to 18
of its final table. Every row runs against real processes: the development
LLM (``devllm``) with ``--slots N --over interrupt`` (a request past its slots
cuts the oldest running stream, as llama-cpp-python's server does), the
Procfile's ``worker`` line twice (two processes, distinct hostnames) on a
namespace and input queue of its own inside the run's virtual host, clients
with pika (``response_<uid>``, declared by the client first) or the openai SDK.

``capacity``: devllm ``--slots 4``, answers of 0.5 s (10 tokens 0.05 s apart),
``LLM_MAX_IN_FLIGHT=4``.

9.  the most requests in flight at the LLM (devllm's ``GET /stats``
    ``max_in_flight``) while 400 requests published at once are answered,
    and the streams it cut (``interrupted``): under ``--over interrupt`` a
    fifth request takes the slot of a running one, so ``max_in_flight``
    never passes 4 and the cuts are what show a fifth;
10. whole answers of those 400: a chunk with a ``finish_reason``, ``[DONE]``,
    the expected content in order, no error;
11. their makespan (first publish to last ``[DONE]``) against the ideal,
    400 x 0.5 s / 4 = 50 s;
12. the CPU of the broker and of the worker processes per waiting request per
    second of waiting: the 4 slots turn over every second (answers of 1 s),
    so the line moves and every place changes each second; CPU over two
    windows with a short line, then over a window with 1,000 more requests
    waiting; the difference over the difference in waiting requests and the
    window's seconds. The broker is shared with whatever else runs on it:
    how far the two short windows differ, on the same scale, is printed
    beside. Once with no request asking for its place, once with all asking
    (``queue_updates: true``): then each waiting request is told its place
    about once a second;
13. time to first token (TTFT) of sequential requests on an empty queue,
    from the publish to the first chunk on ``response_<uid>``: today's code
    against the code before capacity (commit ``8cae869``, a ``git worktree``
    in a temporary directory, its worker run with this venv on
    ``PYTHONPATH`` = the worktree), interleaved, in front of a devllm without
    slots;
14. the peer: LiteLLM's proxy as 2 processes, each with
    ``max_parallel_requests: 4`` on its deployment (``litellm_params``),
    the 400 requests round-robin between them (openai SDK, streaming, its
    default retries), in front of a fresh devllm ``--slots 4``: the most in
    flight at the LLM and the streams it cut, whole answers (LiteLLM ends a
    cut stream with a ``finish_reason`` of its own: the content tells) and
    makespan.

``order``: devllm ``--slots 2``, answers of 0.5 s, ``LLM_MAX_IN_FLIGHT=2``.

15. 60 ``default`` requests waiting, then 4 ``priority``: each priority
    request's first token after its own publish (max, median); beside it the
    same 4 sent as ``default``, what first-in-first-out gives;
16. user A publishes 60, then user B 4 (``username``): each of B's first
    tokens after its publish;
17. positions: 40 requests with ``queue_updates: true`` line up behind two
    answers that hold the slots (of 1.5 s and 1.75 s, so that the starts
    after them come a quarter second apart); nothing else arrives. Each
    ``queue`` message's position is compared with 1 + the number of requests
    whose call started after the message came and before the request's own
    (a call's start: its ``position 0`` message, sent when its call starts).
    A start within ``EPSILON`` after a message may have been dispatched
    before it (the position then rightly left it out), and one within
    ``EPSILON`` of the request's own start may have been dispatched just
    before or after it: such a start is counted on either side; the strict
    count is printed too;
18. the 400 requests of row 10 with tiers and tenants mixed (a third
    ``priority``, a sixth ``flex``, seven usernames), on the capacity setup:
    makespan against row 11's. When both sections run, it runs right after
    row 11, on the same deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pika
import pika.exceptions

from bench import run as bench_run
from bench.bench_worker import AmqpClient, Reading
from bench.peer import LiteLLM, PeerUnavailable, install_litellm, litellm_version
from bench.tools import CpuMeter, broker_pid, log_kinds, median, ms, say, secs
from chatqueue_testing.harness import (
    ROOT,
    Process,
    delete_queues,
    procfile_command,
    rabbitmqctl,
    stop_all,
    wait_for_consumer,
)
from config import Settings, load_settings
from devllm.answers import reply_tokens
from devllm.testing import DevLLM

if TYPE_CHECKING:
    from bench.run import Bench

BEFORE = "8cae869"  # the last commit before capacity: requests go straight to <ns>.tasks
# Row 17: a start whose position-0 message came within this many seconds
# after a queue message may have been dispatched before the message was
# counted; two starts this close may have been dispatched in either order.
EPSILON = 0.05
# Row 12: what "small" means, CPU seconds per waiting request per second.
SMALL = 10e-6


@dataclass(frozen=True)
class Plan:
    """How much each row does."""

    requests: int = 400  # rows 10, 11, 14, 18
    tokens: int = 10
    delay: float = 0.05  # 10 tokens 0.05 s apart: answers of 0.5 s
    slots: int = 4
    waiting: int = 1000  # row 12: the long line
    ahead: int = 250  # row 12: the short line (and the head of the long one)
    window: float = 15.0  # row 12: seconds of each measured window
    backlog: int = 60  # rows 15, 16
    jumpers: int = 4
    order_slots: int = 2
    places: int = 40  # row 17
    timeout: float = 300

    @property
    def answer(self) -> float:
        return self.tokens * self.delay

    @property
    def model(self) -> str:
        return f"cap;delay={self.delay};tokens={self.tokens}"

    # Row 12: answers of 1 s, so the line moves every second.
    turn_model = "turn;delay=0.1;tokens=10"
    # Row 17: the two answers that hold the slots while the line builds, 1.5 s
    # and 1.75 s: the starts after them come a quarter second apart.
    hogs = (("hog;delay=0.05;tokens=30", 30), ("hog;delay=0.05;tokens=35", 35))


FULL = Plan()
QUICK = Plan(requests=100, waiting=300, ahead=150, window=8.0, backlog=30, places=20)


def plan_of(bench: Bench) -> Plan:
    """--quick (its plan's burst is below the full run's) takes the small numbers."""
    return QUICK if bench.plan.burst < bench_run.FULL.burst else FULL


# --- requests and what came back ------------------------------------------------------------


@dataclass
class Asked(Reading):
    """A request with fields of its own (``service_tier``, ``username``,
    ``queue_updates``), and what came back: its places, and whether its
    answer was whole (a chunk with a ``finish_reason`` before ``[DONE]``)."""

    fields: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    places: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def make(cls, prompt: str, tokens: int, **fields: Any) -> Asked:
        messages = [{"role": "user", "content": prompt}]
        expected = "".join(reply_tokens(messages, tokens))
        return cls(uid=str(uuid.uuid4()), prompt=prompt, expected=expected, fields=fields)

    def request(self, model: str) -> bytes:
        body = json.loads(super().request(model))
        body.update(self.fields)
        return json.dumps(body).encode()

    def on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if properties.type == "queue":
            self.places.append((int(json.loads(body)["position"]), time.monotonic()))
            return
        if properties.type == "chunk":
            for choice in json.loads(body).get("choices") or []:
                if choice.get("finish_reason"):
                    self.finished = True
        super().on_message(channel, method, properties, body)

    @property
    def whole(self) -> bool:
        return self.correct and self.finished

    @property
    def started_at(self) -> float:
        """When its call started: its position-0 message, else its first chunk."""
        zero = [at for position, at in self.places if position == 0]
        if zero:
            return zero[0]
        return math.nan if self.first_token_at is None else self.first_token_at


def failures(readings: Sequence[Asked]) -> list[str]:
    return [
        f"uid={r.uid}: done={r.complete} finish_reason={r.finished} "
        f"out_of_order={r.out_of_order} errors={r.errors[:1]} content={''.join(r.parts)[:40]!r}"
        for r in readings
        if not r.whole
    ][:3]


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:.2f} us"


# --- a deployment of its own -----------------------------------------------------------------


class Deployment:
    """The Procfile's worker line ``workers`` times, on a namespace and input
    queue of its own in the run's virtual host, in front of ``llm_url``; with
    ``code``, the checkout at that path (on ``PYTHONPATH``, and the cwd)."""

    def __init__(
        self,
        bench: Bench,
        name: str,
        llm_url: str,
        *,
        workers: int = 2,
        limit: int | None = None,
        code: Path = ROOT,
    ) -> None:
        self.name = name
        self.url = bench.url
        self.namespace = f"{bench.run}-{name}"
        env = dict(bench.env)
        env.update(
            RABBITMQ_URL=bench.url,
            RABBITMQ_QUEUE=f"{self.namespace}-input",
            CHATQUEUE_NAMESPACE=self.namespace,
            RESPONSE_QUEUE_PREFIX=f"{self.namespace}-response_",
            OPENAI_URL=llm_url,
        )
        env.pop("LLM_MAX_IN_FLIGHT", None)
        if limit is not None:
            env["LLM_MAX_IN_FLIGHT"] = str(limit)
        if code != ROOT:
            env["PYTHONPATH"] = str(code)
        self.env = env
        self.settings: Settings = load_settings(env)
        argv = procfile_command("worker")
        self.processes: list[Process] = []
        self.client: AmqpClient | None = None
        try:
            for i in range(workers):
                hostname = f"{self.namespace}-{i}@%h"
                self.processes.append(
                    Process(
                        [*argv, "--hostname", hostname], env, f"{name}{i}", detached=True, cwd=code
                    )
                )
            wait_for_consumer(
                self.url, self.settings.rabbitmq_queue, 90, self.processes[0], workers
            )
            self.client = AmqpClient(self.url, self.settings, self.processes)
        except BaseException:
            self.close()
            raise

    @property
    def amqp(self) -> AmqpClient:
        assert self.client is not None
        return self.client

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def consumers(self, queue: str) -> int | None:
        """Consumers of ``queue`` (None if it does not exist)."""
        channel = self.amqp.connection.channel()
        try:
            ok = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        count = int(ok.method.consumer_count)
        channel.close()
        return count

    def ready(self, queue: str) -> int:
        """Messages ready on ``queue`` (0 if it does not exist)."""
        channel = self.amqp.connection.channel()
        try:
            ok = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        count = int(ok.method.message_count)
        channel.close()
        return count

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        stop_all(self.processes, 20)
        s = self.settings
        queues = [*s.deployment_queues, f"{self.namespace}.tasks.{s.rabbitmq_queue}"]
        queues.append(f"{self.namespace}.accepted")
        try:
            delete_queues(self.url, queues, [s.cancel_exchange, s.accepted_exchange])
        except Exception as exc:
            say(f"  {self.name}: deleting its queues: {exc!r}")
        kinds = log_kinds(self.processes)
        for kind, n in kinds.most_common(5):
            say(f"  {self.name} log: {n} x {kind[:150]}")
        for process in self.processes:
            if process.proc.returncode in (0, -15):
                process.remove_log()
            else:
                say(f"  {process.name} exited {process.proc.returncode}: log {process.log_path}")


@contextlib.contextmanager
def deployment(bench: Bench, name: str, llm_url: str, **kwargs: Any) -> Iterator[Deployment]:
    dep = Deployment(bench, name, llm_url, **kwargs)
    try:
        yield dep
    finally:
        dep.close()


@contextlib.contextmanager
def devllm(**kwargs: Any) -> Iterator[DevLLM]:
    dev = DevLLM(**kwargs).start()
    try:
        yield dev
    finally:
        dev.stop()


def listen(dep: Deployment, channel: Any, readings: Sequence[Asked]) -> None:
    for reading in readings:
        dep.amqp.listen(channel, reading)


def publish(dep: Deployment, channel: Any, readings: Sequence[Asked], model: str) -> None:
    for reading in readings:
        dep.amqp.publish(channel, reading, model)


def wait_for(dep: Deployment, done: Callable[[], bool], timeout: float, what: str) -> None:
    """Process deliveries until ``done()`` (looked at 5 times a second)."""
    last = [0.0, False]

    def check() -> bool:
        now = time.monotonic()
        if now - float(last[0]) >= 0.2:
            last[0], last[1] = now, done()
        return bool(last[1])

    if not dep.amqp.wait(check, timeout):
        raise RuntimeError(f"{dep.name}: not {what} after {timeout} s")


def line_built(bench: Bench, dep: Deployment) -> bool:
    """Every request published is in the dispatcher's hands: nothing left on the
    input queue, nothing ready on ``<ns>.waiting`` (counted by ``rabbitmqctl``
    where the run has its virtual host, so that the intake's unacknowledged
    messages count too)."""
    s = dep.settings
    if not bench.vhost.created:
        return dep.ready(s.rabbitmq_queue) == 0 and dep.ready(s.waiting_queue) == 0
    out = rabbitmqctl(
        "list_queues",
        "-p",
        bench.vhost.name,
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "--no-table-headers",
    )
    depth: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            depth[parts[0]] = (int(parts[1]), int(parts[2]))
    input_ready, input_unacked = depth.get(s.rabbitmq_queue, (0, 0))
    return input_ready + input_unacked == 0 and depth.get(s.waiting_queue, (0, 0))[0] == 0


def drain(dep: Deployment, seconds: float) -> None:
    dep.amqp.wait(lambda: False, seconds)


# --- the sections ----------------------------------------------------------------------------


@dataclass
class Shared:
    """What the two sections share within one run."""

    makespan: float = math.nan  # row 11
    mixed: float = math.nan  # row 18, measured by the capacity section
    mixed_note: str = ""


_SHARED: dict[str, Shared] = {}


def shared(bench: Bench) -> Shared:
    return _SHARED.setdefault(bench.run, Shared())


def capacity(bench: Bench) -> None:
    """Rows 9 to 14 (and 18 when the order section runs too)."""
    plan = plan_of(bench)
    started = time.monotonic()
    say(
        f"\ncapacity (rows 9-14): devllm --slots {plan.slots} --over interrupt, answers of "
        f"{plan.answer:.1f} s ({plan.model!r}), LLM_MAX_IN_FLIGHT={plan.slots}, 2 worker processes"
    )
    with devllm(slots=plan.slots, over="interrupt") as dev:
        burst_rows(bench, plan, dev)
        waiting_cpu(bench, plan, dev)
    ttft_against_before(bench)
    peer_rows(bench, plan)
    say(f"capacity: {time.monotonic() - started:.0f} s")


def four_hundred(
    dep: Deployment, dev: DevLLM, plan: Plan, mixed: bool
) -> tuple[list[Asked], float, dict[str, Any]]:
    """``plan.requests`` published at once; the readings, the makespan and devllm's /stats."""
    readings: list[Asked] = []
    for i in range(plan.requests):
        fields: dict[str, Any] = {}
        if mixed:
            tier = {0: "priority", 3: "priority", 5: "flex"}.get(i % 6)
            if tier:
                fields["service_tier"] = tier
            fields["username"] = f"user-{i % 7}"
        readings.append(Asked.make(f"{'mixed' if mixed else 'plain'} {i}", plan.tokens, **fields))
    dev.reset()
    burst = dep.amqp.burst(list(readings), plan.model, plan.timeout)
    return readings, burst.wall, dev.traffic()


def burst_rows(bench: Bench, plan: Plan, dev: DevLLM) -> None:
    n = plan.requests
    ideal = n * plan.answer / plan.slots
    with deployment(bench, "cap", dev.base_url, limit=plan.slots) as dep:
        say(f"\n10-11. {n} requests published at once (pika, each read on its response_<uid>)")
        readings, wall, stats = four_hundred(dep, dev, plan, mixed=False)
        whole = sum(r.whole for r in readings)
        ratio = wall / ideal
        say(
            f"  whole {whole}/{n}; makespan {wall:.1f} s = {ratio:.3f} x the ideal {ideal:.0f} s; "
            f"devllm: max_in_flight {stats['max_in_flight']}, received {stats['received']}, "
            f"served {stats['served']}, interrupted {stats['interrupted']}"
        )
        for line in failures(readings):
            say(f"    e.g. {line}")
        peak = int(stats["max_in_flight"])
        share = shared(bench)
        share.makespan = wall
        if "order" in bench.sections:
            say(f"\n18. the same {n} with tiers and tenants mixed, on the same deployment")
            mixed, mixed_wall, mixed_stats = four_hundred(dep, dev, plan, mixed=True)
            mixed_whole = sum(r.whole for r in mixed)
            peak = max(peak, int(mixed_stats["max_in_flight"]))
            share.mixed = mixed_wall
            share.mixed_note = (
                f"whole {mixed_whole}/{n}; max_in_flight {mixed_stats['max_in_flight']}"
            )
            say(
                f"  whole {mixed_whole}/{n}; makespan {mixed_wall:.1f} s "
                f"({mixed_wall / wall:.3f} x row 11's {wall:.1f} s); devllm max_in_flight "
                f"{mixed_stats['max_in_flight']}, interrupted {mixed_stats['interrupted']}"
            )
            for line in failures(mixed):
                say(f"    e.g. {line}")
    bench.rows += [
        bench_run.Row(
            9,
            "capacity: most requests in flight at the LLM (devllm max_in_flight)",
            f"{peak} (interrupted {stats['interrupted']})",
            f"devllm --slots {plan.slots}: a request past them cuts a stream",
            f"<= {plan.slots}, none cut",
            bench_run.verdict(peak <= plan.slots, stats["interrupted"] == 0),
        ),
        bench_run.Row(
            10,
            f"capacity: whole answers, {n} published at once, 2 workers",
            f"{whole} of {n}",
            f"devllm received {stats['received']}",
            f"{n} of {n}",
            bench_run.verdict(whole == n),
        ),
        bench_run.Row(
            11,
            f"capacity: makespan of those {n}",
            f"{wall:.1f} s = {ratio:.3f} x ideal",
            f"ideal {n} x {plan.answer:.1f} s / {plan.slots} = {ideal:.0f} s",
            "<= 1.15 x ideal, all whole",
            bench_run.verdict(bench_run.at_most(ratio, 1.15), whole == n),
        ),
    ]


@dataclass
class WaitingCost:
    """CPU seconds a waiting request adds per second of waiting, and how far
    two windows of the same short line differ (on the same scale)."""

    broker: float
    workers: float
    broker_noise: float
    workers_noise: float
    told: float  # queue messages a second in the long window


def waiting_cpu(bench: Bench, plan: Plan, dev: DevLLM) -> None:
    say(
        f"\n12. CPU per waiting request per second: {plan.slots} slots turning over every second "
        f"({plan.turn_model!r}); two windows with about {plan.ahead} waiting, then one with "
        f"{plan.waiting} more; {plan.window:.0f} s each"
    )
    costs = {asking: waiting_window(bench, plan, dev, asking) for asking in (False, True)}
    cells = [
        f"{'all asking' if asking else 'none asking'}: broker {us(c.broker)}, workers "
        f"{us(c.workers)}" + (f" ({c.told:.0f} queue msgs/s)" if asking else "")
        for asking, c in costs.items()
    ]
    noise = "; ".join(
        f"{'asking' if asking else 'none'}: broker {us(c.broker_noise)}, workers "
        f"{us(c.workers_noise)}"
        for asking, c in costs.items()
    )
    small = all(c.broker + c.workers < SMALL for c in costs.values())
    bench.rows.append(
        bench_run.Row(
            12,
            "capacity: CPU a waiting request costs, per second of waiting",
            "; ".join(cells),
            f"two short-line windows differ by (noise) {noise}",
            f"small: < {SMALL * 1e6:.0f} us (1,000 waiting: < 1% of a core)",
            bench_run.verdict(small),
        )
    )


def waiting_window(bench: Bench, plan: Plan, dev: DevLLM, asking: bool) -> WaitingCost:
    """One deployment; a short line measured twice, then a long one: the
    broker's and the workers' CPU a waiting request adds per second (the
    broker is shared with whatever else runs on it: the two short windows
    say how much that moves the figure)."""
    label = "all asking (queue_updates: true)" if asking else "none asking"
    dev.reset()
    with deployment(bench, "asking" if asking else "quiet", dev.base_url, limit=plan.slots) as dep:
        channel = dep.amqp.connection.channel()
        channel.basic_qos(prefetch_count=5000)
        head = [Asked.make(f"ahead {i}", 10, queue_updates=asking) for i in range(plan.ahead)]
        tail = [Asked.make(f"behind {i}", 10, queue_updates=asking) for i in range(plan.waiting)]
        listen(dep, channel, head)
        publish(dep, channel, head, plan.turn_model)
        wait_for(dep, lambda: line_built(bench, dep), 60, "taken in")
        groups: dict[str, list[int | None]] = {
            "broker": [broker_pid(bench.base_url)],
            "workers": list(dep.pids),
            "dev LLM": [dev.pid],
            "bench client": [os.getpid()],
        }

        def window(published: int) -> tuple[CpuMeter, float, float]:
            """The CPU of a window, the mean number waiting, and the queue messages a second."""
            meter = CpuMeter(groups)
            before = int(dev.traffic()["received"])
            meter.start()
            began = time.monotonic()
            drain(dep, plan.window)
            meter.stop()
            ended = time.monotonic()
            after = int(dev.traffic()["received"])
            told = sum(1 for r in head + tail for _, at in r.places if began <= at <= ended)
            return meter, published - (before + after) / 2, told / (ended - began)

        drain(dep, 1.0)
        first, waiting_first, _ = window(plan.ahead)
        second, waiting_second, _ = window(plan.ahead)
        listen(dep, channel, tail)
        publish(dep, channel, tail, plan.turn_model)
        wait_for(dep, lambda: line_built(bench, dep), 120, "taken in")
        drain(dep, 1.0)
        long, waiting_long, rate = window(plan.ahead + plan.waiting)
        waiting_short = (waiting_first + waiting_second) / 2
        extra = (waiting_long - waiting_short) * plan.window

        def cost(group: str) -> tuple[float, float]:
            short = (first[group] + second[group]) / 2
            return (long[group] - short) / extra, abs(first[group] - second[group]) / extra

        broker, broker_noise = cost("broker")
        workers, workers_noise = cost("workers")
        say(
            f"  {label}: short line {waiting_first:.0f} waiting: {first.describe()}; again, "
            f"{waiting_second:.0f} waiting: {second.describe()}; long line {waiting_long:.0f} "
            f"waiting: {long.describe()}; queue messages {rate:.0f}/s"
        )
        say(
            f"  {label}: per waiting request per second: broker {us(broker)} (the two short "
            f"windows differ by {us(broker_noise)}), workers {us(workers)} (differ by "
            f"{us(workers_noise)})"
        )
        channel.close()
        stop_all(dep.processes, 20)
        dep.amqp.forget([r.uid for r in head + tail])
    return WaitingCost(broker, workers, broker_noise, workers_noise, rate)


# --- row 13: TTFT against the code before capacity --------------------------------------------


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A ``git worktree`` of ``commit`` in a temporary directory, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="cq-bench-before-"))
    path = parent / "chatqueue"

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, timeout=120)

    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        try:
            git("worktree", "remove", "--force", str(path))
        except subprocess.CalledProcessError as exc:
            say(f"  git worktree remove {path}: {exc.stderr!r}")
        with contextlib.suppress(OSError):
            parent.rmdir()


def ttft_against_before(bench: Bench) -> None:
    samples, warmup = bench.plan.ttft_samples, bench.plan.ttft_warmup
    model, tokens = bench.plan.ttft_model, bench.plan.ttft_tokens
    say(
        f"\n13. TTFT on an empty queue, sequential: today's code against {BEFORE} (before "
        f"capacity), {samples} samples each after {warmup}, interleaved, {model!r}, a devllm "
        "without slots"
    )
    with (
        devllm() as dev,
        worktree(BEFORE) as before_code,
        deployment(bench, "today", dev.base_url) as today,
        deployment(bench, "before", dev.base_url, code=before_code) as before,
    ):
        tasks_before = f"{before.namespace}.tasks.{before.settings.rabbitmq_queue}"
        checks = {
            f"{before.name}: consumers of {tasks_before}": before.consumers(tasks_before),
            f"{before.name}: {before.settings.task_queue}": before.consumers(
                before.settings.task_queue
            ),
            f"{today.name}: consumers of {today.settings.task_queue}": today.consumers(
                today.settings.task_queue
            ),
        }
        say("  " + "; ".join(f"{k}: {'absent' if v is None else v}" for k, v in checks.items()))
        if not checks[f"{before.name}: consumers of {tasks_before}"]:
            raise RuntimeError(f"the {BEFORE} workers do not consume {tasks_before}")
        if checks[f"{before.name}: {before.settings.task_queue}"] is not None:
            raise RuntimeError(
                f"the {BEFORE} workers declared today's {before.settings.task_queue}"
            )
        banner = sum(tasks_before in p.output() for p in before.processes)
        say(
            f"  the {BEFORE} workers run the worktree's app: they consume {tasks_before} "
            f"(named in the banner of {banner} of {len(before.processes)})"
        )
        times: dict[str, list[float]] = {"today": [], "before": []}
        clients = {"today": today, "before": before}
        for i in range(warmup + samples):
            order = ("today", "before") if i % 2 == 0 else ("before", "today")
            for name in order:
                reading = Reading.new(f"ttft {i} {name}", tokens)
                value = clients[name].amqp.ttft(model, reading, 60)
                if i >= warmup:
                    times[name].append(value)
    new, old = times["today"], times["before"]
    diff = median(new) - median(old)
    paired = median([a - b for a, b in zip(new, old, strict=True)])
    say(
        f"  today {ms(median(new), 2)} median, {ms(p90(new), 2)} p90; {BEFORE} "
        f"{ms(median(old), 2)} median, {ms(p90(old), 2)} p90; difference of medians "
        f"{ms(diff, 2)}, median of paired differences {ms(paired, 2)}"
    )
    bench.rows.append(
        bench_run.Row(
            13,
            "capacity: TTFT on an empty queue, sequential (median / p90)",
            f"{ms(median(new), 2)} / {ms(p90(new), 2)}; {ms(diff, 2)} more than {BEFORE}",
            f"{BEFORE}: {ms(median(old), 2)} / {ms(p90(old), 2)}",
            "within 1 ms of before",
            bench_run.verdict(bench_run.at_most(diff, 0.001)),
        )
    )


# --- row 14: the peer ------------------------------------------------------------------------


class LimitedLiteLLM(LiteLLM):
    """LiteLLM's proxy with ``max_parallel_requests`` on its one deployment
    (``litellm_params``: the limit its router keeps on the calls it makes to
    that deployment, in this process)."""

    def __init__(self, llm_base_url: str, model: str, run: str, limit: int) -> None:
        super().__init__(llm_base_url, [model], run)
        entry = {
            "model_name": model,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": llm_base_url,
                "api_key": "bench",
                "max_parallel_requests": limit,
            },
        }
        self.config.write_text(json.dumps({"model_list": [entry]}))


@dataclass
class PeerAnswer:
    prompt: str
    expected: str
    sent: float = math.nan
    done: float = math.nan
    content: list[str] = field(default_factory=list)
    finished: bool = False
    error: str = ""

    @property
    def whole(self) -> bool:
        return self.finished and not self.error and "".join(self.content) == self.expected


async def _peer_burst(proxies: Sequence[LiteLLM], answers: list[PeerAnswer], model: str) -> None:
    """``answers`` streamed at once, round-robin between ``proxies`` (each with its key)."""
    clients = [
        openai.AsyncOpenAI(base_url=p.url + "/v1", api_key=p.key, timeout=300) for p in proxies
    ]

    async def one(i: int, answer: PeerAnswer) -> None:
        client = clients[i % len(clients)]
        answer.sent = time.monotonic()
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": answer.prompt}], stream=True
            )
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        answer.content.append(choice.delta.content)
                    if choice.finish_reason:
                        answer.finished = True
        except Exception as exc:
            answer.error = f"{type(exc).__name__}: {str(exc)[:120]}"
        answer.done = time.monotonic()

    try:
        await asyncio.gather(*(one(i, a) for i, a in enumerate(answers)))
    finally:
        for client in clients:
            await client.close()


def peer_rows(bench: Bench, plan: Plan) -> None:
    n = plan.requests
    say(
        f"\n14. the peer: LiteLLM's proxy as 2 processes, max_parallel_requests {plan.slots} each "
        f"(litellm_params), {n} streams round-robin between them (openai SDK), a fresh devllm "
        f"--slots {plan.slots} --over interrupt"
    )
    proxies: list[LimitedLiteLLM] = []
    reason = ""
    answers = [
        PeerAnswer(
            f"peer {i}",
            "".join(reply_tokens([{"role": "user", "content": f"peer {i}"}], plan.tokens)),
        )
        for i in range(n)
    ]
    stats: dict[str, Any] = {}
    wall = math.nan
    with devllm(slots=plan.slots, over="interrupt") as dev:
        try:
            exe = install_litellm()
            for i in range(2):
                proxy = LimitedLiteLLM(dev.base_url, plan.model, f"{bench.run}-{i}", plan.slots)
                proxies.append(proxy)
                proxy.start(exe)
            say(f"  LiteLLM {litellm_version()} at {', '.join(p.url for p in proxies)}")
            dev.reset()
            start = time.monotonic()
            asyncio.run(_peer_burst(proxies, answers, plan.model))
            wall = max(a.done for a in answers) - start
            stats = dev.traffic()
        except PeerUnavailable as exc:
            reason = str(exc)
            say(f"  peer: SKIPPED: {reason}")
        finally:
            for proxy in proxies:
                proxy.stop()
    if reason:
        bench.rows.append(
            bench_run.Row(14, "peer: LiteLLM x 2", f"n/a: {reason[:80]}", "", "", "n/a")
        )
        return
    whole = sum(a.whole for a in answers)
    errors = Counter(a.error.split(":")[0] for a in answers if a.error)
    cut = sum(1 for a in answers if not a.error and not a.whole)
    cut_finished = sum(1 for a in answers if not a.error and not a.whole and a.finished)
    ideal = n * plan.answer / plan.slots
    say(
        f"  whole {whole}/{n}; cut short {cut} ({cut_finished} of them still ending with a "
        f"finish_reason); errors {dict(errors)}; makespan "
        f"{wall:.1f} s = {wall / ideal:.3f} x ideal; devllm: max_in_flight "
        f"{stats['max_in_flight']}, received {stats['received']}, served {stats['served']}, "
        f"interrupted {stats['interrupted']}"
    )
    for a in [a for a in answers if not a.whole][:3]:
        say(
            f"    e.g. {a.prompt}: finished={a.finished} error={a.error!r} "
            f"content={''.join(a.content)[:30]!r}"
        )
    ours = {r.number: r for r in bench.rows}

    def beside(number: int) -> str:
        r = ours.get(number)
        return f"chatqueue: {r.figure}" if r else "chatqueue: n/a"

    bench.rows += [
        bench_run.Row(
            14,
            "peer: LiteLLM x 2, most in flight at the LLM",
            f"{stats['max_in_flight']} (interrupted {stats['interrupted']})",
            beside(9),
            f"<= {plan.slots}, none cut",
            bench_run.verdict(int(stats["max_in_flight"]) <= plan.slots, stats["interrupted"] == 0),
        ),
        bench_run.Row(
            14,
            f"peer: LiteLLM x 2, whole answers of {n}",
            f"{whole} of {n} ({cut} cut short, {cut_finished} of them with a finish_reason; "
            f"{sum(errors.values())} errors)",
            beside(10),
            f"{n} of {n}",
            bench_run.verdict(whole == n),
        ),
        bench_run.Row(
            14,
            f"peer: LiteLLM x 2, makespan of {n}",
            f"{wall:.1f} s = {wall / ideal:.3f} x ideal",
            beside(11),
            "<= 1.15 x ideal, all whole",
            bench_run.verdict(bench_run.at_most(wall / ideal, 1.15), whole == n),
        ),
    ]


# --- the order section -----------------------------------------------------------------------


def order(bench: Bench) -> None:
    """Rows 15 to 18."""
    plan = plan_of(bench)
    started = time.monotonic()
    say(
        f"\norder (rows 15-18): devllm --slots {plan.order_slots} --over interrupt, answers of "
        f"{plan.answer:.1f} s, LLM_MAX_IN_FLIGHT={plan.order_slots}, 2 worker processes"
    )
    with (
        devllm(slots=plan.order_slots, over="interrupt") as dev,
        deployment(bench, "order", dev.base_url, limit=plan.order_slots) as dep,
    ):
        fifo = jump_the_line(dep, dev, plan, late={"service_tier": "default"}, label="FIFO")
        priority = jump_the_line(
            dep, dev, plan, late={"service_tier": "priority"}, label="priority"
        )
        tenants = jump_the_line(
            dep,
            dev,
            plan,
            late={"username": "user-b"},
            early={"username": "user-a"},
            label="tenants",
        )
        positions(bench, dep, dev, plan)
    fifo_text = f"FIFO (the same 4 as default): max {secs(max(fifo))}, median {secs(median(fifo))}"
    bench.rows += [
        bench_run.Row(
            15,
            f"order: {plan.backlog} default waiting, then {plan.jumpers} priority: "
            "first token after submit (max / median)",
            f"{secs(max(priority))} / {secs(median(priority))}",
            fifo_text,
            "<= 1.5 s",
            bench_run.verdict(bench_run.at_most(max(priority), 1.5)),
        ),
        bench_run.Row(
            16,
            f"order: user A {plan.backlog}, then user B {plan.jumpers}: B's first token "
            "after submit (max / median)",
            f"{secs(max(tenants))} / {secs(median(tenants))}",
            fifo_text,
            "<= 3 s",
            bench_run.verdict(bench_run.at_most(max(tenants), 3.0)),
        ),
    ]
    share = shared(bench)
    if math.isnan(share.mixed):
        with (
            devllm(slots=plan.slots, over="interrupt") as dev4,
            deployment(bench, "mixed", dev4.base_url, limit=plan.slots) as dep4,
        ):
            if math.isnan(share.makespan):
                say(f"\n18. {plan.requests} requests at once, plain (as row 11), then mixed")
                _, share.makespan, _ = four_hundred(dep4, dev4, plan, mixed=False)
            else:
                say(f"\n18. {plan.requests} requests at once, tiers and tenants mixed")
            readings, share.mixed, stats = four_hundred(dep4, dev4, plan, mixed=True)
            share.mixed_note = (
                f"whole {sum(r.whole for r in readings)}/{plan.requests}; "
                f"max_in_flight {stats['max_in_flight']}"
            )
            say(
                f"  makespan {share.mixed:.1f} s against {share.makespan:.1f} s; {share.mixed_note}"
            )
    ratio = share.mixed / share.makespan
    bench.rows.append(
        bench_run.Row(
            18,
            f"order: {plan.requests} at once, tiers and tenants mixed: makespan",
            f"{share.mixed:.1f} s = {ratio:.3f} x row 11 ({share.mixed_note})",
            f"row 11: {share.makespan:.1f} s",
            "within 5% of row 11",
            bench_run.verdict(bench_run.at_most(abs(ratio - 1), 0.05)),
        )
    )
    say(f"order: {time.monotonic() - started:.0f} s")


def jump_the_line(
    dep: Deployment,
    dev: DevLLM,
    plan: Plan,
    *,
    late: dict[str, Any],
    early: dict[str, Any] | None = None,
    label: str,
) -> list[float]:
    """``plan.backlog`` requests (``early`` fields) wait, then ``plan.jumpers``
    (``late`` fields) come: each late one's time from its publish to its first token."""
    dev.reset()
    channel = dep.amqp.connection.channel()
    channel.basic_qos(prefetch_count=2000)
    early = early or {}
    first = [Asked.make(f"{label} backlog {i}", plan.tokens, **early) for i in range(plan.backlog)]
    then = [Asked.make(f"{label} late {i}", plan.tokens, **late) for i in range(plan.jumpers)]
    listen(dep, channel, [*first, *then])
    publish(dep, channel, first, plan.model)
    wait_for(
        dep,
        lambda: (
            dev.traffic()["in_flight"] == plan.order_slots
            and dep.ready(dep.settings.rabbitmq_queue) == 0
        ),
        60,
        "lined up",
    )
    drain(dep, 0.5)
    publish(dep, channel, then, plan.model)
    everyone = [*first, *then]
    wait_for(dep, lambda: all(r.complete for r in everyone), plan.timeout, "answered")
    channel.close()
    dep.amqp.forget([r.uid for r in everyone])
    firsts = [r.ttft for r in then]
    whole = sum(r.whole for r in everyone)
    say(
        f"\n15-16. {label}: {plan.backlog} {early or 'default'} then {plan.jumpers} {late}: "
        f"first token after submit {', '.join(secs(t) for t in firsts)}; whole {whole}/"
        f"{len(everyone)}; devllm max_in_flight {dev.traffic()['max_in_flight']}"
    )
    for line in failures(everyone):
        say(f"    e.g. {line}")
    return [t if not math.isnan(t) else math.inf for t in firsts]


def holding(dev: DevLLM, slots: int) -> bool:
    return int(dev.traffic()["in_flight"]) == slots


def positions(bench: Bench, dep: Deployment, dev: DevLLM, plan: Plan) -> None:
    n = plan.places
    say(
        f"\n17. positions: {n} requests with queue_updates line up behind two answers holding "
        "the slots (of 1.5 s and 1.75 s); nothing else arrives"
    )
    dev.reset()
    channel = dep.amqp.connection.channel()
    channel.basic_qos(prefetch_count=2000)
    hogs = [Asked.make(f"hog {i}", tokens) for i, (_, tokens) in enumerate(plan.hogs)]
    line = [Asked.make(f"place {i}", plan.tokens, queue_updates=True) for i in range(n)]
    listen(dep, channel, [*hogs, *line])
    for hog, (model, _) in zip(hogs, plan.hogs, strict=True):
        publish(dep, channel, [hog], model)
    wait_for(dep, partial(holding, dev, len(hogs)), 30, "holding the slots")
    publish(dep, channel, line, plan.model)
    everyone = [*hogs, *line]
    wait_for(dep, lambda: all(r.complete for r in everyone), plan.timeout, "answered")
    channel.close()
    dep.amqp.forget([r.uid for r in everyone])
    starts = {r.uid: r.started_at for r in line}
    messages = matched = strict = rises = either = 0
    misses: list[str] = []
    for r in line:
        told = [(p, at) for p, at in r.places if p > 0]
        rises += sum(1 for (a, _), (b, _) in itertools.pairwise(told) if b > a)
        own = starts[r.uid]
        for position, at in told:
            messages += 1
            # Starts after the message and before its own; those within
            # EPSILON of either end may fall on either side.
            after = [s for uid, s in starts.items() if uid != r.uid and at < s < own + EPSILON]
            clear = [s for s in after if at + EPSILON < s < own - EPSILON]
            low, high = len(clear), len(after)
            either += high != low
            if low <= position - 1 <= high:
                matched += 1
            else:
                near = sorted(s - at for s in starts.values() if -1.0 < s - at < 1.0)
                misses.append(
                    f"{r.prompt}: position {position}, starts after it {low}-{high}; "
                    f"starts within 1 s of the message (s): " + " ".join(f"{d:+.3f}" for d in near)
                )
            strict += position - 1 == sum(1 for s in after if s < own)
    zeros = sum(1 for r in line if any(p == 0 for p, _ in r.places))
    gaps = [b - a for a, b in itertools.pairwise(sorted(starts.values()))]
    say(
        f"  starts {ms(min(gaps, default=math.nan), 0)} apart at the least, "
        f"{ms(median(gaps), 0)} in the median"
    )
    whole = sum(r.whole for r in everyone)
    say(
        f"  {messages} queue messages (position > 0) to {n} requests; {zeros} told position 0 "
        f"at their start; matched {matched}/{messages} ({either} with a start within "
        f"{EPSILON * 1000:.0f} ms after the message or of its own, counted either side); strict "
        f"{strict}/{messages}; positions that rose: {rises}; whole {whole}/{len(everyone)}"
    )
    for miss in misses[:8]:
        say(f"    e.g. {miss}")
    bench.rows.append(
        bench_run.Row(
            17,
            "order: reported position against 1 + starts before it (nothing new arriving)",
            f"{matched} of {messages} exact; {rises} rose",
            f"strict (no {EPSILON * 1000:.0f} ms allowance): {strict} of {messages}",
            "exact",
            bench_run.verdict(messages > 0 and matched == messages and rises == 0),
        )
    )
