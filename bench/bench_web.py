"""Benchmark of the web front: concurrent SSE streams, and the time to first token it adds.

    .venv/bin/python -m bench.bench_web [--quick] [--streams N] [--samples N]

It starts its own development LLM, one worker and one web front from the
Procfile's ``worker`` and ``web`` lines (``gunicorn web:app``: one gevent
worker process by default), on queue names of its own run, and measures as an
HTTP client sees it:

1. time to first token: the same request sent directly to the development LLM
   and through the web front, samples interleaved and sequential, both read
   with the same plain HTTP client; through the web front both ways, the
   OpenAI drop-in (one request) and the two steps (``POST`` then ``GET`` the
   SSE stream);
2. concurrent SSE streams held by the one web process and the one worker
   process: N clients at once (asyncio, one connection each) submit and read
   a stream of several seconds; every stream must complete with the right
   content.

It prints each figure as it goes and a summary table at the end, then stops
its processes and deletes its queues (Ctrl-C and SIGTERM included). The
machine is small and shared by every process of the run (the LLM, RabbitMQ,
the worker, the web front and this client): read medians and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    ManagedProcess,
    Plan,
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
    procfile_command,
    rabbitmq_url,
    run_queues,
    say,
    sigterm_as_interrupt,
    source_state,
    start_worker,
)
from config import load_settings
from devllm.answers import reply_tokens
from devllm.testing import DevLLM

QUEUE_TTL = 300
STREAMS_TARGET = 1000


FULL = Plan(
    ttft_samples=200,
    ttft_warmup=20,
    ttft_tokens=5,
    streams=1000,
    stream_tokens=30,
    stream_delay=0.5,
    timeout=300,
)
QUICK = Plan(
    ttft_samples=50,
    ttft_warmup=10,
    ttft_tokens=5,
    streams=200,
    stream_tokens=10,
    stream_delay=0.3,
    timeout=120,
)


def expected(prompt: str, tokens: int) -> str:
    return "".join(reply_tokens([{"role": "user", "content": prompt}], tokens))


def chat_body(prompt: str, model: str, **fields: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **fields}
    return json.dumps(body).encode()


def delta_content(data: str) -> str:
    """The content of one ``data:`` payload of a chunk ("" for anything else)."""
    if not data.startswith("{"):
        return ""
    choices = json.loads(data).get("choices") or []
    return (choices[0].get("delta") or {}).get("content") or "" if choices else ""


# --- 1. time to first token -----------------------------------------------------------------


def first_token(response: http.client.HTTPResponse, start: float, want: str) -> float:
    """Read an SSE response to its end; the time of its first content token."""
    first = math.nan
    parts: list[str] = []
    while line := response.readline():
        text = line.decode().rstrip("\r\n")
        if text.startswith("data: "):
            content = delta_content(text[6:])
            if content and math.isnan(first):
                first = time.perf_counter() - start
            parts.append(content)
    if "".join(parts) != want:
        raise RuntimeError(f"answer {''.join(parts)!r} != {want!r}")
    return first


def ttft_direct(llm: tuple[str, int], model: str, prompt: str, want: str) -> float:
    connection = http.client.HTTPConnection(*llm, timeout=30)
    try:
        start = time.perf_counter()
        connection.request(
            "POST",
            "/v1/chat/completions",
            chat_body(prompt, model, stream=True),
            {"Content-Type": "application/json", "Authorization": "Bearer bench"},
        )
        return first_token(connection.getresponse(), start, want)
    finally:
        connection.close()


def ttft_dropin(web: tuple[str, int], model: str, prompt: str, want: str) -> float:
    connection = http.client.HTTPConnection(*web, timeout=30)
    try:
        start = time.perf_counter()
        connection.request(
            "POST",
            "/openai/v1/chat/completions",
            chat_body(prompt, model, stream=True),
            {"Content-Type": "application/json"},
        )
        return first_token(connection.getresponse(), start, want)
    finally:
        connection.close()


def ttft_two_steps(web: tuple[str, int], model: str, prompt: str, want: str) -> float:
    connection = http.client.HTTPConnection(*web, timeout=30)
    try:
        start = time.perf_counter()
        connection.request(
            "POST",
            "/v1/chat/completions",
            chat_body(prompt, model),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        uid = json.loads(response.read())["uid"]
        connection.request("GET", f"/v1/chat/response?uid={uid}")
        return first_token(connection.getresponse(), start, want)
    finally:
        connection.close()


@dataclass
class TtftResult:
    direct: list[float] = field(default_factory=list)
    dropin: list[float] = field(default_factory=list)
    two_steps: list[float] = field(default_factory=list)


def measure_ttft(llm: tuple[str, int], web: tuple[str, int], plan: Plan) -> TtftResult:
    paths: dict[str, Callable[[tuple[str, int], str, str, str], float]] = {
        "direct": lambda _, *a: ttft_direct(llm, *a),
        "dropin": ttft_dropin,
        "two_steps": ttft_two_steps,
    }
    result = TtftResult()
    order = list(paths)
    for i in range(plan.ttft_warmup + plan.ttft_samples):
        order = order[1:] + order[:1]  # rotate, so drift and caches favour none
        for path in order:
            prompt = f"ttft {i} {path}"
            value = paths[path](web, plan.ttft_model, prompt, expected(prompt, plan.ttft_tokens))
            if i >= plan.ttft_warmup:
                getattr(result, path).append(value)
    return result


# --- 2. concurrent streams ------------------------------------------------------------------


@dataclass
class Client:
    """One SSE client: submit, then read the stream (HTTP/1.0: the body ends at EOF)."""

    prompt: str
    want: str
    uid: str = ""
    sent: float = math.nan
    accepted: float = math.nan  # the 202 came
    opened: float = math.nan  # the GET was sent
    first_token: float = math.nan
    done: float = math.nan
    content: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return not math.isnan(self.done)

    @property
    def correct(self) -> bool:
        return self.complete and "".join(self.content) == self.want


async def request(
    host: str, port: int, head: str, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def run_client(client: Client, web: tuple[str, int], model: str, live: list[int]) -> None:
    host, port = web
    try:
        client.sent = time.perf_counter()
        body = chat_body(client.prompt, model)
        reader, writer = await request(
            host,
            port,
            "POST /v1/chat/completions HTTP/1.0\r\nHost: bench\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n",
            body,
        )
        status, _, payload = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        if b" 202 " not in status.split(b"\r\n")[0]:
            raise RuntimeError(f"submit: {status.splitlines()[0]!r} {payload[:200]!r}")
        uid = client.uid = json.loads(payload)["uid"]
        client.accepted = time.perf_counter()
        reader, writer = await request(
            host, port, f"GET /v1/chat/response?uid={uid} HTTP/1.0\r\nHost: bench\r\n\r\n"
        )
        client.opened = time.perf_counter()
        live[0] += 1
        live[1] = max(live[1], live[0])
        try:
            while line := await reader.readline():
                text = line.decode().rstrip("\r\n")
                if not text.startswith("data: "):
                    continue
                if text == "data: [DONE]":
                    client.done = time.perf_counter()
                    break
                content = delta_content(text[6:])
                if content:
                    if not client.content:
                        client.first_token = time.perf_counter()
                    client.content.append(content)
        finally:
            live[0] -= 1
            writer.close()
    except Exception as exc:
        client.error = f"{type(exc).__name__}: {exc}"


async def run_clients(clients: list[Client], web: tuple[str, int], plan: Plan) -> int:
    live = [0, 0]  # open SSE streams now, and at most
    tasks = [run_client(c, web, plan.stream_model, live) for c in clients]
    await asyncio.wait_for(asyncio.gather(*tasks), plan.timeout)
    return live[1]


# --- the run --------------------------------------------------------------------------------


def gunicorn_workers(master: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def wait_for_web(url: str, web: ManagedProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        web.check_alive()
        try:
            with opener.open(url + "/ping", timeout=2) as response:
                if response.read() == b"pong":
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the web front never answered /ping:\n{web.output()[-4000:]}")


class Bench:
    def __init__(self, plan: Plan, log_level: str) -> None:
        self.plan = plan
        self.url = rabbitmq_url()
        self.names = RunNames.new("web")
        self.port = _free_port()
        self.env = child_env(
            RABBITMQ_URL=self.url,
            **self.names.env(),
            RESPONSE_QUEUE_TTL=str(QUEUE_TTL),
            DEDUP_WINDOW=str(QUEUE_TTL),
            OPENAI_MODEL="bench",
            LOG_LEVEL=log_level,
            PORT=str(self.port),
        )
        self.settings = load_settings(self.env)
        self.summary: list[list[str]] = []
        self.dev: DevLLM | None = None
        self.worker: ManagedProcess | None = None
        self.web: ManagedProcess | None = None
        self.web_pid = 0
        self.uids: list[str] = []  # of the concurrent streams: their claims go at the end

    def start(self) -> None:
        print(f"run {self.names.run}; code under test: {source_state()}")
        self.dev = dev = DevLLM().start()
        self.env["OPENAI_URL"] = dev.base_url
        self.worker = start_worker(self.env, hostname=f"{self.names.run}@%h")
        self.web = web = ManagedProcess(procfile_command("web"), self.env, "web")
        wait_for_web(f"http://127.0.0.1:{self.port}", web)
        workers = gunicorn_workers(web.pid)
        if len(workers) != 1:
            raise RuntimeError(f"expected one gunicorn worker process, found {workers}")
        self.web_pid = workers[0]
        print(
            f"dev LLM at {dev.base_url}; worker pid {self.worker.pid}; web front "
            f"'{' '.join(web.argv)}' on port {self.port}, one worker process (pid {self.web_pid})"
        )
        self.cpu = CpuMeter(
            {
                "web": self.web_pid,
                "worker": self.worker.pid,
                "dev LLM": devllm_pid(dev),
                "bench client": os.getpid(),
                "rabbitmq (shared)": find_pid("beam.smp"),
            }
        )
        self.rss_start = proc_status_kib(self.web_pid, "VmRSS")

    def ttft(self) -> None:
        plan = self.plan
        assert self.dev is not None
        print(
            f"\n1. time to first token, {plan.ttft_samples} sequential samples each way "
            f"(after {plan.ttft_warmup} warm-up), model {plan.ttft_model!r}"
        )
        llm = ("127.0.0.1", self.dev.port)
        self.cpu.start()
        result = measure_ttft(llm, ("127.0.0.1", self.port), plan)
        self.cpu.stop()
        rows = [
            ("direct to the dev LLM", result.direct),
            ("web, OpenAI drop-in", result.dropin),
            ("web, POST + GET SSE", result.two_steps),
            ("difference, drop-in - direct", _minus(result.dropin, result.direct)),
            ("difference, POST + GET - direct", _minus(result.two_steps, result.direct)),
        ]
        for label, values in rows:
            print(
                f"  {label:34} median {ms(median(values)):>9}   p99 {ms(percentile(values, 99)):>9}"
            )
        print(f"  CPU (share of one core): {self.cpu.describe()}")
        self.summary += [
            [f"TTFT {label} (median / p99)", f"{ms(median(v))} / {ms(percentile(v, 99))}"]
            for label, v in rows
        ]

    def streams(self) -> None:
        plan = self.plan
        assert self.dev is not None and self.worker is not None
        n = plan.streams
        one = plan.stream_tokens * plan.stream_delay
        print(
            f"\n2. {n} concurrent SSE clients through one web process and one worker process, "
            f"model {plan.stream_model!r} (one stream: {one:.1f} s)"
        )
        clients = [Client(f"web stream {i}", "") for i in range(n)]
        for c in clients:
            c.want = expected(c.prompt, plan.stream_tokens)
        self.dev.reset()
        self.cpu.start()
        start = time.perf_counter()
        try:
            peak_open = asyncio.run(run_clients(clients, ("127.0.0.1", self.port), plan))
        finally:
            self.uids = [c.uid for c in clients if c.uid]
        wall = time.perf_counter() - start
        self.cpu.stop()
        completed = sum(c.complete for c in clients)
        wrong = sum(c.complete and not c.correct for c in clients)
        failed = [c.error for c in clients if c.error]
        ttfts = [c.first_token - c.sent for c in clients if not math.isnan(c.first_token)]
        submits = [c.accepted - c.sent for c in clients if not math.isnan(c.accepted)]
        accepted = [c.accepted for c in clients if not math.isnan(c.accepted)]
        all_accepted = max(accepted, default=start) - start
        peak_llm = int(self.dev.stats()["peak_active_streams"])
        hwm = proc_status_kib(self.web_pid, "VmHWM")
        print(f"  completed {completed} / {n}, wrong content {wrong}, failed {len(failed)}")
        for error in failed[:5]:
            print(f"    e.g. {error}")
        print(
            f"  web submits (POST to 202): median {ms(median(submits))}, "
            f"p99 {ms(percentile(submits, 99))}; all {n} accepted after {all_accepted:.1f} s"
        )
        print(f"  SSE streams open at once (client side), at most: {peak_open}")
        print(f"  LLM streams open at once, at most: {peak_llm}")
        print(
            f"  wall time {wall:.1f} s; TTFT under load median {ms(median(ttfts))}, "
            f"p99 {ms(percentile(ttfts, 99))} (LLM alone: {ms(plan.stream_delay)})"
        )
        print(f"  CPU (share of one core): {self.cpu.describe()}")
        print(
            f"  web worker RSS: {self.rss_start / 1024:.0f} MiB at start, peak {hwm / 1024:.0f} MiB"
        )
        verdict = (
            "met" if completed == n and not wrong and peak_open >= STREAMS_TARGET else "NOT met"
        )
        self.summary += [
            [
                f"{n} SSE streams: completed / wrong / failed",
                f"{completed} / {wrong} / {len(failed)}",
            ],
            [f"{n} SSE streams: open at once (web / LLM)", f"{peak_open} / {peak_llm}"],
            [f"{n} SSE streams: wall time", f"{wall:.1f} s (one stream: {one:.1f} s)"],
            [
                f"{n} SSE streams: web submit, POST to 202 (median / p99)",
                f"{ms(median(submits))} / {ms(percentile(submits, 99))}",
            ],
            [
                f"{n} SSE streams: TTFT under load (median / p99)",
                f"{ms(median(ttfts))} / {ms(percentile(ttfts, 99))}",
            ],
            [f"{n} SSE streams: web CPU", f"{self.cpu.used.get('web', math.nan):.1f} s"],
            [f"{n} SSE streams: web peak RSS", f"{hwm / 1024:.0f} MiB"],
            [f"target: {STREAMS_TARGET}+ complete streams held at once", verdict],
        ]

    def close(self) -> None:
        say("\ncleaning up...")
        steps: list[tuple[str, Callable[[], object]]] = []
        for what, process in (("web", self.web), ("worker", self.worker)):
            if process is not None:
                steps.append((f"stopping the {what}", process.stop))
        if self.dev is not None:
            steps.append(("stopping the dev LLM", self.dev.stop))
        queues = run_queues(self.settings, self.uids)
        steps.append(
            (
                f"deleting the queues of {self.names.run}",
                lambda: delete_queues(self.url, queues, [self.settings.cancel_exchange]),
            )
        )
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                say(f"  {what}: {exc!r}")
        for process in (self.web, self.worker):
            if process is not None and process.proc.returncode in (0, -15):
                process.remove_log()


def _minus(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(plan: Plan, log_level: str, skip_ttft: bool) -> list[list[str]]:
    bench = Bench(plan, log_level)
    try:
        bench.start()
        if not skip_ttft:
            bench.ttft()
        bench.streams()
        return bench.summary
    finally:
        bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_web",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small numbers, about a minute")
    parser.add_argument("--samples", type=int, help="time-to-first-token samples each way (200)")
    parser.add_argument("--streams", type=int, help="concurrent SSE streams (1000)")
    parser.add_argument("--no-ttft", action="store_true", help="only the concurrent streams")
    parser.add_argument("--log-level", default="warning", help="LOG_LEVEL of the processes")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    chosen = {"ttft_samples": args.samples, "streams": args.streams}
    plan = replace(plan, **{k: v for k, v in chosen.items() if v is not None})
    sigterm_as_interrupt()
    started = time.perf_counter()
    try:
        summary = run(plan, args.log_level, args.no_ttft)
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
