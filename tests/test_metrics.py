"""``GET /metrics`` after real requests: two real workers, a real web front,
the development LLM; the scrape parsed with prometheus_client's parser.

Each test counts deltas between two scrapes, on queue names of this module's
own, so the requests of other tests never show in its counts.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    RABBITMQ_URL,
    ROOT,
    Broker,
    EventStream,
    Process,
    Web,
    WebFactory,
    WorkerFactory,
    about,
    chat,
    delete_queues,
    fetch,
    processes,
    scrape,
    stream,
    submit,
    value,
    wait_until,
)

DASHBOARD = ROOT / "docs" / "grafana" / "chatqueue.json"


def counting(model: str = "devllm", **fields: Any) -> dict[str, Any]:
    """A request for ``model`` (the development LLM's misbehaviours ride on it)."""
    return chat("Count.", model=model, **fields)


class Reports:
    """The snapshots the processes publish on ``<ns>.metrics``, heard on a
    queue of the test's own from the moment it is made."""

    def __init__(self, client: Broker) -> None:
        self.channel = client.connection.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, client.env["CHATQUEUE_NAMESPACE"] + ".metrics")
        self.latest: dict[str, dict[str, Any]] = {}  # by process
        self.heard: Counter[int] = Counter()  # snapshots by pid

    def hear(self) -> None:
        while (got := self.channel.basic_get(self.queue, auto_ack=True))[0] is not None:
            snapshot = json.loads(got[2])
            self.latest[snapshot["process"]] = snapshot
            self.heard[int(snapshot["process"].split(":")[1])] += 1  # host:pid:tag

    def wait(self, pids: list[int], rounds: int = 2, timeout: float = 10) -> None:
        """Until each process of ``pids`` has published ``rounds`` snapshots
        since this was made: every listener has heard each one's counts of
        before it, and at least once since."""

        def all_heard() -> bool:
            self.hear()
            return all(self.heard[pid] >= rounds for pid in pids)

        wait_until(all_heard, timeout, lambda: f"snapshots heard {dict(self.heard)} of {pids}")

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def metrics_env(worker_env: dict[str, str]) -> Iterator[dict[str, str]]:
    tag = f"{worker_env['CHATQUEUE_NAMESPACE']}-m{uuid.uuid4().hex[:4]}"
    env = {
        **worker_env,
        "RABBITMQ_QUEUE": f"{tag}-input",
        "CHATQUEUE_NAMESPACE": tag,
        "METRICS_INTERVAL": "0.3",
        "SSE_KEEPALIVE": "1",
        "WEB_ANSWER_TIMEOUT": "30",
        "WEB_RESUME_GRACE": "0.5",  # a reader that leaves is cancelled soon
    }
    yield env
    delete_queues(RABBITMQ_URL, (), [f"{tag}.metrics"])


@pytest.fixture(scope="module")
def workers(start_worker: WorkerFactory, metrics_env: dict[str, str]) -> list[Process]:
    return [start_worker("metrics-a", metrics_env), start_worker("metrics-b", metrics_env)]


@pytest.fixture(scope="module")
def front(start_web: WebFactory, metrics_env: dict[str, str], workers: list[Process]) -> Web:
    web = start_web("metrics", metrics_env)
    wait_until(
        lambda: processes(scrape(web)) == {"worker": 2, "web": 1},
        30,
        about("two workers and one web process report their metrics", web),
    )
    return web


@pytest.fixture
def client(metrics_env: dict[str, str]) -> Iterator[Broker]:
    broker = Broker(RABBITMQ_URL, metrics_env)
    yield broker
    broker.close()


class Delta:
    """Counts since the scrape that made it."""

    def __init__(self, web: Web) -> None:
        self.web = web
        self.before = scrape(web)
        self.after = self.before

    def refresh(self) -> Delta:
        self.after = scrape(self.web)
        return self

    def __call__(self, metric: str, /, **labels: str) -> float:
        return value(self.after, metric, **labels) - value(self.before, metric, **labels)


def tokens(events: EventStream) -> int:
    return sum(1 for e in events.events if e.content)


def test_counts_after_real_requests(front: Web, client: Broker, workers: list[Process]) -> None:
    delta = Delta(front)
    # Two answers read as SSE, an LLM error, one the SDK retries (a 503 once,
    # without retry-after: a 429 would pause the upstream instead).
    answered = [stream(front, submit(front, counting())) for _ in range(2)]
    failed = stream(front, submit(front, counting("devllm;status=400")))
    retried = stream(
        front, submit(front, counting(f"devllm;status=503;times=1;tag={uuid.uuid4()}"))
    )
    # One non-streaming answer through the drop-in, and a request that is no JSON.
    status, _, raw = fetch("POST", front.url + "/openai/v1/chat/completions", counting())
    assert status == 200, raw
    client.publish(b"{not json")

    streams = [*answered, failed, retried]
    assert all(s.events[-1].data == "[DONE]" for s in streams)
    assert json.loads(failed.events[0].data)["error"]["code"] == "invalid_request"
    received = sum(len(s.events) for s in streams) + 2  # the completion and its [DONE]

    def counted() -> bool:
        d = delta.refresh()
        return (
            d("chatqueue_requests_total", outcome="answered", code="") == 4
            and d("chatqueue_requests_total", outcome="dead_lettered", code="invalid_json") == 1
            and d("chatqueue_web_requests_total", endpoint="openai.chat_completions", status="200")
            == 1
        )

    wait_until(counted, 30, about("the requests are counted", front))
    # Every process reports twice more: a count that comes late would be in.
    reports = Reports(client)
    reports.wait([w.pid for w in workers] + front.worker_pids())
    reports.close()
    d = delta.refresh()
    assert d("chatqueue_requests_accepted_total") == 5
    assert d("chatqueue_requests_total", outcome="answered", code="") == 4
    assert d("chatqueue_requests_total", outcome="error", code="invalid_request") == 1
    assert d("chatqueue_requests_total", outcome="dead_lettered", code="invalid_json") == 1
    assert d("chatqueue_requests_total", outcome="cancelled", code="") == 0
    assert d("chatqueue_messages_total") == received
    assert d("chatqueue_tokens_total") == sum(tokens(s) for s in streams)
    assert d("chatqueue_llm_responses_total", status="200") == 4
    assert d("chatqueue_llm_responses_total", status="400") == 1
    assert d("chatqueue_llm_responses_total", status="503") == 1
    assert d("chatqueue_llm_retries_total", kind="sdk") == 1
    # Histograms: every answer has a duration; the four with an LLM payload a TTFT.
    assert d("chatqueue_stream_duration_seconds_count") == 5
    assert d("chatqueue_stream_duration_seconds_bucket", le="+Inf") == 5
    for name in ("ttft", "ttft_added", "llm_ttft"):
        assert d(f"chatqueue_{name}_seconds_count") == 4, name
        assert d(f"chatqueue_{name}_seconds_sum") > 0, name
    assert d("chatqueue_ttft_added_seconds_sum") < d("chatqueue_ttft_seconds_sum")
    # The web front's requests, by route and status.
    assert d("chatqueue_web_requests_total", endpoint="submit.create", status="202") == 4
    assert d("chatqueue_web_requests_total", endpoint="sse.response", status="200") == 4
    # Nothing in flight once all is answered; the bad request waits in the dead-letter queue.
    after = delta.after
    assert value(after, "chatqueue_streams_in_flight") == 0
    assert value(after, "chatqueue_web_streams_in_flight") == 0
    dead_letter = client.env["CHATQUEUE_NAMESPACE"] + ".dead-letter"

    def depths_read() -> bool:
        # The depths are read at a scrape and kept DEPTH_CACHE (2 s): the
        # reading may be older than the dead letter.
        after = scrape(front)
        return value(after, "chatqueue_queue_messages", queue="dead_letter", name=dead_letter) == 1

    wait_until(depths_read, 10, about("the dead letter in the queue's depth", front))
    after = scrape(front)
    assert value(after, "chatqueue_queue_messages", queue="input", name=client.input_queue) == 0
    assert value(after, "chatqueue_queue_consumers", queue="input", name=client.input_queue) == 2


def test_a_stream_broken_before_its_first_token_is_a_retry_and_a_restart(
    front: Web, client: Broker
) -> None:
    delta = Delta(front)
    uid = str(uuid.uuid4())
    # The opening chunk goes out, then the LLM drops the connection, once.
    client.publish(counting(f"devllm;fault=disconnect;at=0;times=1;tag={uid}", uid=uid))
    first, again = client.answer(uid).split()
    assert first.messages and again.done

    def counted() -> bool:
        return delta.refresh()("chatqueue_requests_total", outcome="answered", code="") == 1

    wait_until(counted, 30, about("the answer is counted", front))
    assert delta("chatqueue_llm_retries_total", kind="stream") == 1
    assert delta("chatqueue_restarts_total", reason="llm_retry") == 1
    assert delta("chatqueue_llm_responses_total", status="200") == 2
    assert delta("chatqueue_messages_total") == len(first.messages) + len(again.messages)


def test_a_client_that_leaves_is_counted_as_cancelled(front: Web) -> None:
    delta = Delta(front)
    # About 10 s of answer: only the cancel ends it sooner.
    uid = submit(front, counting("devllm;delay=0.1;tokens=100"))
    cut = stream(front, uid, until=lambda s: len(s.events) >= 3)
    assert len(cut.events) == 3

    def cancelled() -> bool:
        return delta.refresh()("chatqueue_requests_total", outcome="cancelled", code="") == 1

    wait_until(cancelled, 15, about("the cancel is counted", front))
    assert delta("chatqueue_requests_total", outcome="answered", code="") == 0
    assert delta("chatqueue_stream_duration_seconds_count") == 1
    wait_until(
        lambda: value(scrape(front), "chatqueue_streams_in_flight") == 0,
        30,
        about("no stream is in flight", front),
    )


def test_streams_in_flight_while_answers_stream(front: Web, client: Broker) -> None:
    uids = [str(uuid.uuid4()) for _ in range(3)]
    for uid in uids:  # about 3 s of answer each
        client.publish(counting("devllm;delay=0.1;tokens=30", uid=uid))
    wait_until(
        lambda: value(scrape(front), "chatqueue_streams_in_flight") == 3,
        30,
        about("three streams in flight", front),
    )
    for uid in uids:
        assert client.answer(uid).done
    wait_until(
        lambda: value(scrape(front), "chatqueue_streams_in_flight") == 0,
        30,
        about("the streams leave the gauge when they end", front),
    )


def test_the_sum_is_over_every_process(front: Web, client: Broker, workers: list[Process]) -> None:
    """The scrape is the sum of the snapshots each process publishes."""
    reports = Reports(client)
    for _ in range(6):
        client.publish(b"\xff\xfe")  # not UTF-8: dead-lettered as invalid_encoding

    def dead_lettered() -> float:
        return value(
            scrape(front),
            "chatqueue_requests_total",
            outcome="dead_lettered",
            code="invalid_encoding",
        )

    wait_until(lambda: dead_lettered() == 6, 30, about("six dead letters", front))
    # Every process once more, with the same counts.
    reports.wait([w.pid for w in workers] + front.worker_pids())
    reports.close()
    latest = reports.latest

    def dead_letters(snapshot: dict[str, Any]) -> float:
        return sum(
            v
            for family in snapshot["families"]
            for name, labels, v in family["samples"]
            if name == "chatqueue_requests_total" and labels.get("code") == "invalid_encoding"
        )

    per_worker = [dead_letters(s) for s in latest.values() if s["role"] == "worker"]
    assert len(per_worker) == 2
    # RabbitMQ hands the input messages to both intakes in turn.
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == dead_lettered() == 6


def test_metrics_stay_open_with_api_keys_unless_asked(
    start_web: WebFactory, metrics_env: dict[str, str], workers: list[Process]
) -> None:
    open_web = start_web("metrics-open", metrics_env, API_KEYS="k1")
    assert fetch("GET", open_web.url + "/metrics")[0] == 200
    assert fetch("POST", open_web.url + "/v1/chat/completions", counting())[0] == 401
    keyed = start_web("metrics-keyed", metrics_env, API_KEYS="k1", METRICS_REQUIRE_KEY="true")
    assert fetch("GET", keyed.url + "/metrics")[0] == 401
    assert scrape(keyed, {"Authorization": "Bearer k1"})


def test_every_web_process_answers_for_the_whole_deployment(
    start_web: WebFactory,
    front: Web,
    client: Broker,
    workers: list[Process],
    metrics_env: dict[str, str],
) -> None:
    webs = processes(scrape(front))["web"]
    two = start_web("metrics-two", metrics_env, WEB_CONCURRENCY="2")
    assert len(two.worker_pids()) == 2
    wait_until(
        lambda: processes(scrape(front))["web"] == webs + 2,
        30,
        about("two more web processes", front),
    )
    uid = submit(two, counting())
    assert stream(two, uid).events[-1].data == "[DONE]"

    def streams_served(web: Web) -> float:
        return value(
            scrape(web), "chatqueue_web_requests_total", endpoint="sse.response", status="200"
        )

    wait_until(
        lambda: streams_served(front) == streams_served(two),
        30,
        about("the same totals from both fronts", front),
    )
    # Every worker reports twice more: every listener has its last snapshot.
    reports = Reports(client)
    reports.wait([w.pid for w in workers])
    reports.close()
    # Each scrape is a new connection, taken by either process of the second front.
    answers = {
        (processes(got)["worker"], value(got, "chatqueue_requests_accepted_total"))
        for got in (scrape(two) for _ in range(10))
    }
    assert len(answers) == 1, answers


def test_the_dashboard_asks_only_for_metrics_that_exist(front: Web) -> None:
    status, _, raw = fetch("GET", front.url + "/metrics")
    assert status == 200
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    # Each family the scrape declares (a labelled one may have no series yet).
    names = {
        family.name + suffix
        for family in text_string_to_metric_families(raw.decode())
        for suffix in suffixes.get(family.type, ("",))
    }
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    asked = {n for q in queries for n in re.findall(r"\bchatqueue_[a-z_]+", q)}
    assert len(queries) >= 5
    assert asked, queries
    assert asked <= names, asked - names


def test_a_stopped_worker_keeps_its_counts(
    start_worker: WorkerFactory,
    front: Web,
    client: Broker,
    workers: list[Process],
    metrics_env: dict[str, str],
) -> None:
    """A worker that stops sends its last snapshot: its counts stay in the totals,
    and it leaves the process count (and its gauges) at once."""
    # It reports when it starts and when it stops, and not in between: only
    # its last snapshot brings its counts, and takes it out of the count long
    # before three of its intervals.
    extra = start_worker("metrics-c", metrics_env, METRICS_INTERVAL="600")
    wait_until(
        lambda: processes(scrape(front)).get("worker") == 3, 30, about("a third worker", front)
    )
    dead_letter = client.env["CHATQUEUE_NAMESPACE"] + ".dead-letter"

    def dead_lettered() -> float:
        return value(
            scrape(front), "chatqueue_requests_total", outcome="dead_lettered", code="invalid_json"
        )

    before, waiting = dead_lettered(), client.queue_length(dead_letter)
    for _ in range(9):  # the three intakes take them in turn
        client.publish(b"{broken")
    wait_until(
        lambda: client.queue_length(dead_letter) == waiting + 9,
        30,
        about("nine dead letters", front),
    )
    # The two others report twice more: their counts are in; the third's are not.
    reports = Reports(client)
    reports.wait([w.pid for w in workers])
    reports.close()
    third = extra.output().count("rejected (invalid_json)")
    assert 0 < third < 9, extra.output()[-3000:]
    assert dead_lettered() - before == 9 - third
    extra.stop()
    wait_until(
        lambda: processes(scrape(front)).get("worker") == 2, 30, about("back to two workers", front)
    )
    assert dead_lettered() - before == 9
