"""Capacity: an upstream never has more LLM calls at once than its
``max_in_flight``, summed over every worker, held by RabbitMQ (app/dispatcher.py).

Each test runs a deployment of its own (input queue and namespace) in front
of a development LLM of its own, which counts what it receives (``/stats``).
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from chatqueue_testing.rabbitnode import RabbitNode
from devllm.testing import DevLLM
from tests.support import (
    Answer,
    WebFactory,
    WorkerFactory,
    about,
    chat,
    client_of,
    collect,
    deployment,
    expected,
    holds_for,
    send,
    wait_until,
)


@pytest.fixture
def slow_llm() -> Iterator[DevLLM]:
    """Answers of 10 tokens, 0.05 s apart (about half a second each)."""
    with DevLLM(token_delay=0.05, tokens=10) as server:
        yield server


def as_read(answer: Answer) -> str:
    """The text a reader that follows the contract keeps: a message with
    ``seq`` 0 starts the answer over (a restart, or what a worker that lost its
    connection writes again), and it drops what it had."""
    text: list[str] = []
    for message in answer.messages:
        if message.kind not in ("chunk", "completion", "error", "done"):
            continue
        if message.seq == 0:
            text = []
        if message.kind == "chunk":
            choices = message.json["choices"]
            text.append((choices[0]["delta"].get("content") or "") if choices else "")
    return "".join(text)


def test_the_limit_holds_over_two_workers(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
) -> None:
    """30 requests at once, two worker processes, a limit of 3: the LLM serves 3
    at a time (not fewer, not more), and every answer is whole."""
    env = deployment(worker_env, names, slow_llm, "two", LLM_MAX_IN_FLIGHT="3")
    workers = [own_worker("cap-a", env=env), own_worker("cap-b", env=env)]
    with client_of(env) as broker:
        prompts = [f"limit {i}" for i in range(30)]
        uids = send(broker, [chat(p) for p in prompts])
        answers = collect(broker, uids, timeout=60)
    for uid, prompt in zip(uids, prompts, strict=True):
        assert answers[uid].done, about(f"{uid} not answered", *workers)()
        assert answers[uid].content == expected(prompt, 10)
    traffic = slow_llm.traffic()
    assert traffic["received"] == 30
    assert traffic["max_in_flight"] == 3


@pytest.mark.slow
def test_a_worker_killed_mid_run_gives_its_slots_back(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
) -> None:
    """A worker SIGKILLed while it streams: RabbitMQ gives its task messages
    back in their slots, the other worker answers them, and the LLM never has
    more than the limit at once."""
    env = deployment(worker_env, names, slow_llm, "kill", LLM_MAX_IN_FLIGHT="3")
    doomed = own_worker("cap-doomed", env=env)
    survivor = own_worker("cap-survivor", env=env)
    with client_of(env) as broker:
        prompts = [f"killed {i}" for i in range(18)]
        uids = send(broker, [chat(p, model="m;tokens=20;delay=0.05") for p in prompts])
        wait_until(lambda: slow_llm.traffic()["received"] >= 6, 30, about("no start", doomed))
        os.kill(doomed.pid, signal.SIGKILL)
        answers = collect(broker, uids, timeout=90)
    unanswered = [uid for uid in uids if not answers[uid].done]
    assert not unanswered, about(f"{len(unanswered)} not answered", survivor)()
    for uid, prompt in zip(uids, prompts, strict=True):
        assert as_read(answers[uid]) == expected(prompt, 20)
    assert slow_llm.traffic()["max_in_flight"] <= 3


def test_queue_timeout_ends_a_request_that_waited_too_long(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
) -> None:
    """One slot, taken by a long answer: a request with ``queue_timeout`` 0.5
    ends with the error code ``queue_timeout`` (504) and ``[DONE]``, and the
    LLM never hears of it."""
    env = deployment(worker_env, names, slow_llm, "qt", LLM_MAX_IN_FLIGHT="1")
    worker = own_worker("cap-qt", env=env)
    with client_of(env) as broker:
        long, short = send(
            broker,
            [chat("hog", model="m;tokens=40;delay=0.05"), chat("in vain", queue_timeout=0.5)],
        )
        timed_out = broker.answer(short, timeout=20)
        assert timed_out.done, about("no answer", worker)()
        [error] = timed_out.errors
        assert error["error"]["code"] == "queue_timeout"
        assert timed_out.messages[-2].properties.headers["status"] == 504
        assert broker.answer(long, timeout=30).done
    bodies = slow_llm.stats()["last_requests"]
    assert [b["messages"][0]["content"] for b in bodies] == ["hog"]


@pytest.mark.slow
def test_a_request_cancelled_while_it_waits_never_reaches_the_llm(
    own_worker: WorkerFactory,
    own_web: WebFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
) -> None:
    """Its SSE reader leaves while it waits: the web front cancels it, the
    dispatcher takes it out of the line, and it never takes a slot."""
    env = deployment(worker_env, names, slow_llm, "cancel", LLM_MAX_IN_FLIGHT="1")
    worker = own_worker("cap-cancel", env=env)
    web = own_web("cap-cancel", env={**env, "SSE_KEEPALIVE": "1", "WEB_RESUME_GRACE": "0.5"})
    hog = httpx2.post(
        web.url + "/v1/chat/completions", json=chat("hog", model="m;tokens=60;delay=0.05")
    ).json()["uid"]
    left = httpx2.post(web.url + "/v1/chat/completions", json=chat("left")).json()["uid"]
    with httpx2.stream(
        "GET", web.url + "/v1/chat/response", params={"uid": left}, timeout=30
    ) as response:
        lines = response.iter_lines()
        wait_until(lambda: "queue.status" in next(lines), 10, about("no place told", worker))
    # The reader left: the answer waits WEB_RESUME_GRACE for it, then it is cancelled.
    with httpx2.stream(
        "GET", web.url + "/v1/chat/response", params={"uid": hog}, timeout=30
    ) as response:
        assert "data: [DONE]" in list(response.iter_lines())
    holds_for(lambda: slow_llm.traffic()["received"] == 1, 1.5, about("asked", worker))
    assert "cancelled while waiting" in worker.output()


@pytest.mark.slow
def test_a_429_pauses_the_upstream_for_every_worker(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
) -> None:
    """The LLM answers 429 with ``retry-after: 2``: no call reaches it for those
    two seconds, from either worker; the request that got the 429 waits again
    (its retries untouched) and is answered after the pause, first."""
    env = deployment(worker_env, names, slow_llm, "pause", LLM_MAX_IN_FLIGHT="2")
    workers = [own_worker("cap-p1", env=env), own_worker("cap-p2", env=env)]
    limited = "m;status=429;retry_after=2;times=1"
    with client_of(env) as broker:
        [first] = send(broker, [chat("limited", model=limited)])
        wait_until(lambda: slow_llm.traffic()["on_demand"].get("429") == 1, 20)
        refused_at = slow_llm.traffic()["received_log"][-1]
        others = send(broker, [chat(f"after {i}") for i in range(4)])
        answers = collect(broker, [first, *others], timeout=60)
    assert all(a.done for a in answers.values()), about("not answered", *workers)()
    log = slow_llm.traffic()["received_log"]
    during = [t for t in log if refused_at < t < refused_at + 1.9]
    assert during == [], f"{len(during)} calls during the pause"
    after = [t for t in log if t > refused_at]
    assert len(after) == 5 and after[0] >= refused_at + 1.9
    assert answers[first].content == expected("limited", 10)


UPSTREAMS = """
[[upstream]]
name = "small"
url = "{small}"
api_key = "none"
models = ["alpha*", "shared*"]
max_in_flight = 2
fallback = ["big"]

[[upstream]]
name = "big"
url = "{big}"
api_key = "none"
models = ["beta*", "shared*"]
max_in_flight = 4
"""


@pytest.mark.slow
def test_routing_by_model_model_not_found_and_fallback_on_503(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """Each model goes to the first upstream that serves it; a model none
    serves ends in ``model_not_found`` (404); a request whose upstream answers
    503 (busy, a server with one slot) after its retries falls back on the next."""
    with (
        DevLLM(token_delay=0.01, tokens=5, slots=1, over="503") as small,
        DevLLM(token_delay=0.01, tokens=5) as big,
    ):
        path = tmp_path / "upstreams.toml"
        path.write_text(UPSTREAMS.format(small=small.base_url, big=big.base_url))
        env = deployment(worker_env, names, small, "route", UPSTREAMS_FILE=str(path))
        worker = own_worker("cap-route", env=env)
        with client_of(env) as broker:
            alpha, beta, nowhere = send(
                broker,
                [chat("a", model="alpha-1"), chat("b", model="beta-1"), chat("x", model="x")],
            )
            for uid in (alpha, beta):
                assert broker.answer(uid).done, about("not answered", worker)()
            assert small.traffic()["received"] == 1 and big.traffic()["received"] == 1
            refused = broker.answer(nowhere)
            [error] = refused.errors
            assert error["error"]["code"] == "model_not_found"
            assert refused.messages[0].properties.headers["status"] == 404
            # The small upstream's only slot is busy: the next call there gets 503.
            [hog] = send(broker, [chat("hog", model="alpha-2;tokens=100;delay=0.05")])
            wait_until(lambda: small.traffic()["in_flight"] == 1, 10)
            [fell] = send(broker, [chat("fell back", model="shared-1")])
            answer = broker.answer(fell, timeout=30)
            assert answer.content == expected("fell back", 5), about("no fallback", worker)()
            assert small.traffic()["refused"]["503"] >= 1
            assert any(b["model"] == "shared-1" for b in big.stats()["last_requests"])
            assert broker.answer(hog, timeout=30).done


@pytest.mark.slow
def test_the_limit_holds_across_a_broker_restart(
    rabbit_node: RabbitNode,
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
) -> None:
    """The broker restarts while two slots stream: those streams go on and keep
    their slots, nothing else takes them, and what waited is answered after."""
    env = {
        **deployment(worker_env, names, slow_llm, "restart", LLM_MAX_IN_FLIGHT="2"),
        "RABBITMQ_URL": rabbit_node.url,
    }
    workers = [own_worker("cap-r1", env=env), own_worker("cap-r2", env=env)]
    with client_of(env) as broker:
        prompts = [f"restart {i}" for i in range(8)]
        uids = send(broker, [chat(p, model="m;tokens=40;delay=0.05") for p in prompts])
        wait_until(lambda: slow_llm.traffic()["in_flight"] == 2, 20, about("no start", *workers))
    rabbit_node.restart_app()
    with client_of(env) as broker:
        answers = collect(broker, uids, timeout=120)
    assert all(a.done for a in answers.values()), about("not answered", *workers)()
    for uid, prompt in zip(uids, prompts, strict=True):
        assert as_read(answers[uid]) == expected(prompt, 40), [
            (m.seq, m.restart, (m.properties.headers or {}).get("replay"))
            for m in answers[uid].messages
        ]
    assert slow_llm.traffic()["max_in_flight"] <= 2


@pytest.mark.slow
def test_rpm_spaces_the_starts_over_every_worker(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    slow_llm: DevLLM,
    tmp_path: Path,
) -> None:
    """``rpm = 120``: whichever worker answers them, calls start at most one
    every half second, though slots are free."""
    path = tmp_path / "upstreams.toml"
    path.write_text(
        f'[[upstream]]\nname = "paced"\nurl = "{slow_llm.base_url}"\napi_key = "none"\n'
        'models = ["*"]\nmax_in_flight = 10\nrpm = 120\n'
    )
    env = deployment(worker_env, names, slow_llm, "rpm", UPSTREAMS_FILE=str(path))
    workers = [own_worker("rpm-a", env=env), own_worker("rpm-b", env=env)]
    with client_of(env) as broker:
        uids = send(broker, [chat(f"paced {i}") for i in range(6)])
        answers = collect(broker, uids, timeout=60)
    assert all(a.done for a in answers.values()), about("not answered", *workers)()
    log = slow_llm.traffic()["received_log"]
    gaps = [b - a for a, b in itertools.pairwise(log)]
    assert len(log) == 6 and min(gaps) >= 0.45, gaps
