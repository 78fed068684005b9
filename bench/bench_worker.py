"""Benchmark of the worker: added latency, concurrent streams, throughput.

    .venv/bin/python -m bench.bench_worker [--quick] [--streams N] [--requests N]

It starts its own development LLM and one worker from the Procfile's
``worker`` line, on queue names of its own run, and measures, as a client
would see it (pika on one side, the response queues on the other):

1. time to first token: the same request sent through chatqueue and directly
   to the development LLM with the openai SDK, samples interleaved, sequential;
2. concurrent streams: N streams of several seconds each, published at once;
3. throughput: many short answers published at once.

It prints each figure as it goes and a summary table at the end, then stops
its processes and deletes its queues (Ctrl-C and SIGTERM included). The
machine is shared and small: read medians and ratios, not single figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import openai
import pika

from app.broker import claim_queue_name, response_queue_arguments
from bench.common import (
    CpuMeter,
    ManagedProcess,
    RunNames,
    child_env,
    delete_queues,
    devllm_pid,
    find_pid,
    format_table,
    median,
    ms,
    percentile,
    proc_status_kib,
    rabbitmq_url,
    run_queues,
    say,
    sigterm_as_interrupt,
    source_state,
    start_worker,
    uninterrupted,
)
from bench.common import Plan as BasePlan
from config import Settings, load_settings
from devllm.answers import reply_tokens
from devllm.testing import DevLLM

# Seconds an unread response queue (and a uid's claim) lives: short, so that a
# run killed with SIGKILL leaves nothing for long.
QUEUE_TTL = 300
# The time to first token that chatqueue may add, median.
TTFT_TARGET = 0.005


@dataclass(frozen=True)
class Plan(BasePlan):
    """How much of each measure to run: the common ones and short requests."""

    requests: int = 0
    short_tokens: int = 5

    @property
    def short_model(self) -> str:
        return f"bench;first_delay=0;delay=0;tokens={self.short_tokens}"


FULL = Plan(
    ttft_samples=200,
    ttft_warmup=20,
    ttft_tokens=5,
    streams=1000,
    # 30 s streams, a token a second each: longer than starting 1,000 takes,
    # so all are open at once (with 4 s streams the first end before the last
    # begin), at a token rate one process carries (1,000 messages a second).
    stream_tokens=30,
    stream_delay=1.0,
    requests=2000,
    short_tokens=5,
    timeout=300,
)
QUICK = Plan(
    ttft_samples=50,
    ttft_warmup=10,
    ttft_tokens=5,
    streams=200,
    stream_tokens=40,
    stream_delay=0.1,
    requests=300,
    short_tokens=5,
    timeout=120,
)


# --- reading one answer ---------------------------------------------------------------------


@dataclass
class Reading:
    """One request and what came back on its response queue."""

    uid: str
    prompt: str
    expected: str
    sent_at: float = math.nan
    first_token_at: float | None = None
    done_at: float | None = None
    parts: list[str] = field(default_factory=list)
    content_chunks: int = 0
    messages: int = 0
    next_seq: int = 0
    out_of_order: int = 0
    restarts: int = 0
    errors: list[str] = field(default_factory=list)

    def request(self, model: str) -> bytes:
        return json.dumps(
            {
                "uid": self.uid,
                "model": model,
                "messages": [{"role": "user", "content": self.prompt}],
            }
        ).encode()

    def on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        now = time.perf_counter()
        headers = properties.headers or {}
        seq = headers.get("seq")
        if headers.get("restart") and seq == 0 and self.messages:
            self.restarts += 1
            self.parts.clear()
            self.next_seq = 0
        self.messages += 1
        if seq != self.next_seq:
            self.out_of_order += 1
        self.next_seq = (seq if isinstance(seq, int) else self.next_seq) + 1
        if body == b"[DONE]":
            self.done_at = now
            return
        if properties.type == "error":
            self.errors.append(body.decode(errors="replace"))
            return
        if properties.type != "chunk":
            self.errors.append(f"unexpected message type {properties.type!r}")
            return
        choices = json.loads(body).get("choices") or []
        content = choices[0].get("delta", {}).get("content") if choices else None
        if content:
            self.parts.append(content)
            self.content_chunks += 1
            if self.first_token_at is None:
                self.first_token_at = now

    @property
    def complete(self) -> bool:
        return self.done_at is not None

    @property
    def correct(self) -> bool:
        return (
            self.complete
            and not self.errors
            and not self.out_of_order
            and "".join(self.parts) == self.expected
        )

    @property
    def ttft(self) -> float:
        return math.nan if self.first_token_at is None else self.first_token_at - self.sent_at


def new_reading(prompt: str, tokens: int) -> Reading:
    messages = [{"role": "user", "content": prompt}]
    return Reading(str(uuid.uuid4()), prompt, "".join(reply_tokens(messages, tokens)))


class Client:
    """A pika client of chatqueue: declares the response queues, consumes, publishes."""

    def __init__(self, url: str, settings: Settings, worker: ManagedProcess) -> None:
        self.settings = settings
        self.worker = worker
        self.queue_arguments = response_queue_arguments(settings)
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.used: list[str] = []  # uids whose queues are still to be deleted

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def listen(self, channel: Any, reading: Reading) -> str:
        """Declare the response queue of ``reading`` as the worker does, and consume it."""
        self.used.append(reading.uid)
        queue = self.settings.response_queue(reading.uid)
        # As the README tells clients: durable, with the worker's x-expires.
        channel.queue_declare(queue, durable=True, arguments=self.queue_arguments)
        tag: str = channel.basic_consume(queue, reading.on_message, auto_ack=True)
        return tag

    def publish(self, channel: Any, reading: Reading, model: str) -> None:
        body = reading.request(model)
        reading.sent_at = time.perf_counter()
        channel.basic_publish("", self.settings.rabbitmq_queue, body)

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Process deliveries until ``done()`` or ``timeout``; the worker must stay up."""
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while not done():
            now = time.monotonic()
            if now > deadline:
                return False
            if now - checked > 1:
                self.worker.check_alive()
                checked = now
            self.connection.process_data_events(time_limit=0.05)
        return True

    def forget(self, uids: Sequence[str]) -> None:
        """Delete the response queues and the claims of ``uids``."""
        for uid in uids:
            self.channel.queue_delete(self.settings.response_queue(uid))
            self.channel.queue_delete(claim_queue_name(self.settings, uid))
        gone = set(uids)
        self.used = [u for u in self.used if u not in gone]


# --- 1. time to first token -----------------------------------------------------------------


@dataclass
class TtftResult:
    direct: list[float] = field(default_factory=list)
    chatqueue: list[float] = field(default_factory=list)

    @property
    def differences(self) -> list[float]:
        return [c - d for c, d in zip(self.chatqueue, self.direct, strict=True)]


def direct_ttft(llm: openai.OpenAI, model: str, reading: Reading) -> float:
    """Time to the first content chunk of a stream straight from the LLM."""
    messages: Any = [{"role": "user", "content": reading.prompt}]
    parts: list[str] = []
    first = math.nan
    start = time.perf_counter()
    with llm.chat.completions.create(model=model, messages=messages, stream=True) as chunks:
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                if not parts:
                    first = time.perf_counter() - start
                parts.append(chunk.choices[0].delta.content)
    if "".join(parts) != reading.expected:
        raise RuntimeError(f"direct answer {''.join(parts)!r} != {reading.expected!r}")
    return first


def chatqueue_ttft(client: Client, model: str, reading: Reading, timeout: float) -> float:
    """Time from the publish to the first content chunk on the response queue."""
    tag = client.listen(client.channel, reading)
    client.publish(client.channel, reading, model)
    finished = client.wait(lambda: reading.complete, timeout)
    client.channel.basic_cancel(tag)
    client.forget([reading.uid])
    if not finished or not reading.correct:
        raise RuntimeError(
            f"uid={reading.uid}: chatqueue answered {''.join(reading.parts)!r} (done "
            f"{reading.complete}, errors {reading.errors}), not {reading.expected!r}"
        )
    return reading.ttft


def measure_ttft(client: Client, llm: openai.OpenAI, plan: Plan) -> TtftResult:
    """Sequential pairs of samples, the first ``ttft_warmup`` pairs dropped."""
    model = plan.ttft_model
    result = TtftResult()
    for i in range(plan.ttft_warmup + plan.ttft_samples):
        pair: dict[str, float] = {}
        # Alternate which goes first, so that drift and caches favour neither.
        for path in ("direct", "chatqueue") if i % 2 == 0 else ("chatqueue", "direct"):
            reading = new_reading(f"ttft {i} {path}", plan.ttft_tokens)
            if path == "direct":
                pair[path] = direct_ttft(llm, model, reading)
            else:
                pair[path] = chatqueue_ttft(client, model, reading, plan.timeout)
        if i >= plan.ttft_warmup:
            result.direct.append(pair["direct"])
            result.chatqueue.append(pair["chatqueue"])
    return result


# --- 2. and 3. many requests at once --------------------------------------------------------


@dataclass
class BurstResult:
    readings: list[Reading]
    wall: float
    publish_time: float
    peak_llm_streams: int
    cpu: str
    worker_cpu: float

    @property
    def completed(self) -> int:
        return sum(r.correct for r in self.readings)

    @property
    def lost(self) -> int:
        return sum(not r.complete for r in self.readings)

    @property
    def wrong(self) -> int:
        return sum(r.complete and not r.correct for r in self.readings)

    @property
    def content_chunks(self) -> int:
        return sum(r.content_chunks for r in self.readings)

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.readings)

    @property
    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.readings if r.first_token_at is not None]

    @property
    def durations(self) -> list[float]:
        return [
            r.done_at - r.first_token_at
            for r in self.readings
            if r.done_at is not None and r.first_token_at is not None
        ]

    def print(self, one_stream: float | None, first_delay: float) -> None:
        n = len(self.readings)
        print(f"  completed with [DONE] and the full expected content: {self.completed}/{n}")
        print(f"  lost (no [DONE] in time): {self.lost}; wrong content or errors: {self.wrong}")
        print(f"  publishing all {n} took {ms(self.publish_time)}")
        line = f"  wall time, first publish to last [DONE]: {self.wall:.2f} s"
        if one_stream is not None:
            line += f" (one stream alone lasts about {one_stream:.1f} s)"
        print(line)
        print(f"  peak concurrent streams seen by the dev LLM: {self.peak_llm_streams}")
        print(
            f"  time to first token: median {ms(median(self.ttfts))}, "
            f"p99 {ms(percentile(self.ttfts, 99))}, max {ms(max(self.ttfts, default=math.nan))}"
            f" (the LLM alone takes {ms(first_delay)})"
        )
        print(
            f"  stream duration, first token to [DONE]: median {median(self.durations):.2f} s, "
            f"p99 {percentile(self.durations, 99):.2f} s"
        )
        print(f"  CPU (share of one core): {self.cpu}")
        print(
            f"  worker CPU: {1000 * self.worker_cpu / n:.2f} ms per request, "
            f"{1e6 * self.worker_cpu / max(self.messages, 1):.0f} us per response message"
        )
        for r in [r for r in self.readings if not r.correct][:3]:
            print(
                f"    e.g. uid={r.uid}: done={r.complete} messages={r.messages} "
                f"out_of_order={r.out_of_order} errors={r.errors[:1]} "
                f"content={''.join(r.parts)[:60]!r}"
            )


# --- the run --------------------------------------------------------------------------------


def worker_log_problems(output: str) -> list[str]:
    """The worker's WARNING/ERROR/CRITICAL lines and tracebacks."""
    pattern = re.compile(r"(WARNING|ERROR|CRITICAL)/|Traceback")
    return [line for line in output.splitlines() if pattern.search(line)]


class Bench:
    """The processes and the client of one run; :meth:`close` removes everything."""

    def __init__(self, plan: Plan, log_level: str) -> None:
        self.plan = plan
        self.url = rabbitmq_url()
        self.names = RunNames.new("worker")
        self.env = child_env(
            RABBITMQ_URL=self.url,
            **self.names.env(),
            RESPONSE_QUEUE_TTL=str(QUEUE_TTL),
            DEDUP_WINDOW=str(QUEUE_TTL),
            OPENAI_MODEL="bench",
            LOG_LEVEL=log_level,
        )
        self.settings = load_settings(self.env)
        self.summary: list[list[str]] = []
        self.dev: DevLLM | None = None
        self.worker: ManagedProcess | None = None
        self.client: Client | None = None

    def start(self) -> None:
        settings = self.settings
        print(
            f"run {self.names.run}: input queue {settings.rabbitmq_queue}, "
            f"response queues {settings.response_queue('<uid>')}"
        )
        print(f"code under test: {source_state()}")
        self.dev = dev = DevLLM().start()
        self.env["OPENAI_URL"] = dev.base_url
        started = time.perf_counter()
        self.worker = worker = start_worker(self.env, hostname=f"{self.names.run}@%h")
        print(
            f"worker pid {worker.pid} up in {time.perf_counter() - started:.1f} s: "
            f"{' '.join(worker.argv[1:])}"
        )
        print(f"dev LLM at {dev.base_url}; worker log {worker.log_path}")
        self.client = Client(self.url, settings, worker)
        self.llm = openai.OpenAI(base_url=dev.base_url, api_key="bench", max_retries=0)
        self.cpu = CpuMeter(
            {
                "worker": worker.pid,
                "dev LLM": devllm_pid(dev),
                "bench client": os.getpid(),
                "rabbitmq (shared)": find_pid("beam.smp"),
            }
        )
        self.rss_start = proc_status_kib(worker.pid, "VmRSS")
        print(f"worker RSS at start: {self.rss_start / 1024:.0f} MiB")

    def ttft(self) -> None:
        plan = self.plan
        assert self.client is not None
        print(
            f"\n1. time to first token, {plan.ttft_samples} sequential samples each way "
            f"(after {plan.ttft_warmup} warm-up), model {plan.ttft_model!r}"
        )
        self.cpu.start()
        ttft = measure_ttft(self.client, self.llm, plan)
        self.cpu.stop()
        diffs = ttft.differences
        rows = (
            ("direct to the dev LLM", ttft.direct),
            ("through chatqueue", ttft.chatqueue),
            ("difference (chatqueue - direct)", diffs),
        )
        for label, values in rows:
            print(
                f"  {label:32} median {ms(median(values)):>9}   p99 {ms(percentile(values, 99)):>9}"
            )
        print(f"  CPU (share of one core): {self.cpu.describe()}")
        verdict = "met" if median(diffs) < TTFT_TARGET else "NOT met"
        print(f"  target: median difference under {ms(TTFT_TARGET)}: {verdict}")
        self.summary += [
            [f"TTFT {label} (median / p99)", f"{ms(median(v))} / {ms(percentile(v, 99))}"]
            for label, v in rows
        ]
        self.summary.append([f"TTFT target: median difference < {ms(TTFT_TARGET)}", verdict])

    def burst(self, n: int, model: str, tokens: int, label: str) -> BurstResult:
        """Publish ``n`` requests at once and read every answer on one connection."""
        assert self.client is not None and self.dev is not None
        client = self.client
        readings = [new_reading(f"{label} {i}", tokens) for i in range(n)]
        channel = client.connection.channel()
        for reading in readings:
            client.listen(channel, reading)
        self.dev.reset()
        self.cpu.start()
        start = time.perf_counter()
        for reading in readings:
            client.publish(channel, reading, model)
        published = time.perf_counter() - start
        left = set(range(n))

        def all_done() -> bool:
            left.difference_update([i for i in left if readings[i].complete])
            return not left

        client.wait(all_done, self.plan.timeout)
        ends = [r.done_at for r in readings if r.done_at is not None]
        wall = (max(ends) if ends else time.perf_counter()) - start
        self.cpu.stop()
        peak = int(self.dev.stats()["peak_active_streams"])
        channel.close()
        client.forget([r.uid for r in readings])
        worker_cpu = self.cpu.used.get("worker", math.nan)
        return BurstResult(readings, wall, published, peak, self.cpu.describe(), worker_cpu)

    def streams(self) -> None:
        plan = self.plan
        assert self.worker is not None
        n = plan.streams
        one = plan.stream_tokens * plan.stream_delay
        print(f"\n2. {n} concurrent streams published at once, model {plan.stream_model!r}")
        result = self.burst(n, plan.stream_model, plan.stream_tokens, "stream")
        hwm = proc_status_kib(self.worker.pid, "VmHWM")
        result.print(one, plan.stream_delay)
        print(f"  worker peak RSS (VmHWM): {hwm / 1024:.0f} MiB")
        self.summary += [
            [
                f"{n} streams: completed / lost / wrong",
                f"{result.completed} / {result.lost} / {result.wrong}",
            ],
            [f"{n} streams: peak open at the dev LLM", str(result.peak_llm_streams)],
            [f"{n} streams: wall time", f"{result.wall:.2f} s (one stream: {one:.1f} s)"],
            [
                f"{n} streams: TTFT (median / p99)",
                f"{ms(median(result.ttfts))} / {ms(percentile(result.ttfts, 99))} "
                f"(LLM alone: {ms(plan.stream_delay)})",
            ],
            [
                f"{n} streams: worker peak RSS (VmHWM)",
                f"{hwm / 1024:.0f} MiB (at start {self.rss_start / 1024:.0f} MiB)",
            ],
        ]

    def throughput(self) -> None:
        plan = self.plan
        n = plan.requests
        print(f"\n3. throughput: {n} short requests published at once, model {plan.short_model!r}")
        result = self.burst(n, plan.short_model, plan.short_tokens, "short")
        result.print(None, 0.0)
        rps = result.completed / result.wall
        tps = result.content_chunks / result.wall
        print(
            f"  {rps:.0f} requests/s, {tps:.0f} streamed tokens/s "
            f"({result.messages / result.wall:.0f} response messages/s)"
        )
        self.summary += [
            [
                f"{n} short requests: completed / lost / wrong",
                f"{result.completed} / {result.lost} / {result.wrong}",
            ],
            [f"{n} short requests: throughput", f"{rps:.0f} requests/s, {tps:.0f} tokens/s"],
            [
                f"{n} short requests: worker CPU per request",
                f"{1000 * result.worker_cpu / n:.2f} ms",
            ],
        ]

    def worker_log(self) -> None:
        assert self.worker is not None
        output = self.worker.output()
        mismatched = output.count("exists with other arguments")
        if mismatched:
            print(
                f"\nNOTE: the worker found {mismatched} response queues declared with other "
                "arguments than its own: this client's declaration is out of date"
            )
        problems = worker_log_problems(output)
        self.summary.append(["worker log: warning/error lines", str(len(problems))])
        if problems:
            print(f"\nworker log: {len(problems)} warning/error lines, e.g.:")
            for line in problems[:5]:
                print(f"  {line[:200]}")

    def close(self) -> None:
        """Stop the processes and delete the run's queues, whatever happened."""
        with uninterrupted():
            self._close()

    def _close(self) -> None:
        say("\ncleaning up...")
        uids = self.client.used if self.client is not None else []
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.client is not None:
            steps.append(("closing the client", self.client.close))
        if self.worker is not None:
            steps.append(("stopping the worker", self.worker.stop))
        if self.dev is not None:
            steps.append(("stopping the dev LLM", self.dev.stop))
        queues = run_queues(self.settings, uids)
        exchanges = [self.settings.cancel_exchange]
        steps.append(
            (
                f"deleting the queues of {self.names.run}",
                lambda: delete_queues(self.url, queues, exchanges),
            )
        )
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                say(f"  {what}: {exc!r}")
        if self.worker is not None:
            if self.worker.proc.returncode == 0:
                self.worker.remove_log()
            else:
                say(
                    f"  worker exit status {self.worker.proc.returncode}; its log is kept: "
                    f"{self.worker.log_path}"
                )


def run(plan: Plan, log_level: str) -> list[list[str]]:
    bench = Bench(plan, log_level)
    try:
        bench.start()
        bench.ttft()
        bench.streams()
        bench.throughput()
        bench.worker_log()
        return bench.summary
    finally:
        bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small numbers, well under a minute")
    parser.add_argument("--samples", type=int, help="time-to-first-token samples each way (200)")
    parser.add_argument("--streams", type=int, help="concurrent streams (1000)")
    parser.add_argument("--requests", type=int, help="short requests for the throughput (2000)")
    parser.add_argument("--log-level", default="info", help="the worker's LOG_LEVEL (info)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    chosen = {"ttft_samples": args.samples, "streams": args.streams, "requests": args.requests}
    plan = replace(plan, **{k: v for k, v in chosen.items() if v is not None})
    sigterm_as_interrupt()
    started = time.perf_counter()
    try:
        summary = run(plan, args.log_level)
    except KeyboardInterrupt:
        say("interrupted: processes stopped, queues deleted")
        return 130
    print(
        f"\nsummary ({'quick' if args.quick else 'full'} run, "
        f"{time.perf_counter() - started:.0f} s, {os.cpu_count()} cores, shared machine)"
    )
    print(format_table(summary, ["measure", "figure"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
