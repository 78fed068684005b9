"""Order in the line: service tiers, a fair share between tenants, and each
waiting client told its place (app/waiting.py, app/dispatcher.py).

Each test runs a deployment of its own with one slot, in front of a
development LLM of its own: a first long answer holds the slot while the
test's requests line up, and the order in which the LLM is asked is the order
of the starts.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import websocket

from devllm.testing import DevLLM
from tests.support import (
    Broker,
    WebFactory,
    WorkerFactory,
    about,
    chat,
    client_of,
    collect,
    deployment,
    send,
    wait_until,
    ws_request,
    ws_url,
)

HOG = "m;tokens=30;delay=0.05"  # holds the slot about 1.5 s


@pytest.fixture
def llm_one() -> Iterator[DevLLM]:
    with DevLLM(token_delay=0.02, tokens=5) as server:
        yield server


def one_slot(
    worker_env: dict[str, str], names: dict[str, str], llm: DevLLM, name: str, **env: str
) -> dict[str, str]:
    """A deployment of the test's own whose upstream has one slot."""
    return deployment(worker_env, names, llm, name, LLM_MAX_IN_FLIGHT="1", **env)


def asked(llm: DevLLM) -> list[str]:
    """The prompts the LLM was asked, in order."""
    return [b["messages"][-1]["content"] for b in llm.stats()["last_requests"]]


def hog_the_slot(broker: Broker, llm: DevLLM) -> str:
    [hog] = send(broker, [chat("hog", model=HOG)])
    wait_until(lambda: llm.traffic()["in_flight"] == 1, 20)
    return hog


def test_priority_goes_before_default_and_default_before_flex(
    own_worker: WorkerFactory, worker_env: dict[str, str], names: dict[str, str], llm_one: DevLLM
) -> None:
    """Over two workers: whatever the order of arrival, the priority requests
    start first, then default (and auto, and none), then flex."""
    env = one_slot(worker_env, names, llm_one, "tiers")
    workers = [own_worker("tier-a", env=env), own_worker("tier-b", env=env)]
    with client_of(env) as broker:
        hog = hog_the_slot(broker, llm_one)
        tiers = ["flex", None, "priority", "auto", "flex", "default", "priority"]
        bodies = [
            chat(f"{tier}-{i}", **({"service_tier": tier} if tier else {}))
            for i, tier in enumerate(tiers)
        ]
        uids = send(broker, bodies)
        answers = collect(broker, [hog, *uids], timeout=60)
    assert all(a.done for a in answers.values()), about("not answered", *workers)()
    assert asked(llm_one) == [
        "hog",
        "priority-2",
        "priority-6",
        "None-1",
        "auto-3",
        "default-5",
        "flex-0",
        "flex-4",
    ]


@pytest.mark.slow
def test_tenants_take_turns_by_username(
    own_worker: WorkerFactory, worker_env: dict[str, str], names: dict[str, str], llm_one: DevLLM
) -> None:
    """Alice has eight requests waiting when Bob sends two: Bob's start second
    and fourth, not after Alice's eight."""
    env = one_slot(worker_env, names, llm_one, "fair")
    worker = own_worker("fair", env=env)
    with client_of(env) as broker:
        hog = hog_the_slot(broker, llm_one)
        alice = send(broker, [chat(f"alice-{i}", username="alice") for i in range(8)])
        bob = send(broker, [chat(f"bob-{i}", username="bob") for i in range(2)])
        answers = collect(broker, [hog, *alice, *bob], timeout=60)
    assert all(a.done for a in answers.values()), about("not answered", worker)()
    order = asked(llm_one)[1:]
    assert order[:5] == ["alice-0", "bob-0", "alice-1", "bob-1", "alice-2"]


@pytest.mark.slow
def test_tenants_take_turns_by_api_key(
    own_worker: WorkerFactory,
    own_web: WebFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    llm_one: DevLLM,
) -> None:
    """With API_KEYS the tenant is the key, whatever the username says: one
    key's six requests under six usernames do not crowd out another key's."""
    env = one_slot(worker_env, names, llm_one, "keys", API_KEYS="key-alice,key-bob")
    own_worker("keys", env=env)
    web = own_web("keys", env=env)

    def post(key: str, body: dict[str, Any]) -> str:
        response = httpx2.post(
            web.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 202, response.text
        return str(response.json()["uid"])

    post("key-alice", chat("hog", model=HOG))
    wait_until(lambda: llm_one.traffic()["in_flight"] == 1, 20)
    for i in range(6):
        post("key-alice", chat(f"alice-{i}", username=f"user-{i}"))
    post("key-bob", chat("bob-0", username="user-0"))
    wait_until(lambda: llm_one.traffic()["received"] == 8, 60)
    assert asked(llm_one)[1:4] == ["alice-0", "bob-0", "alice-1"]


@pytest.mark.slow
def test_a_key_s_tier_is_capped(
    own_worker: WorkerFactory,
    own_web: WebFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    llm_one: DevLLM,
) -> None:
    """A key capped at default asks for priority: served, at default (after a
    priority request of an uncapped key that came later)."""
    env = one_slot(
        worker_env,
        names,
        llm_one,
        "cap",
        API_KEYS="key-alice,key-bob",
        API_KEY_TIERS="key-bob=default",
    )
    own_worker("cap", env=env)
    web = own_web("cap", env=env)
    auth = {"key-alice": {"Authorization": "Bearer key-alice"}}
    auth["key-bob"] = {"Authorization": "Bearer key-bob"}
    url = web.url + "/v1/chat/completions"
    httpx2.post(url, json=chat("hog", model=HOG), headers=auth["key-alice"])
    wait_until(lambda: llm_one.traffic()["in_flight"] == 1, 20)
    bob = httpx2.post(url, json=chat("bob", service_tier="priority"), headers=auth["key-bob"])
    assert bob.status_code == 202
    alice = chat("alice", service_tier="priority")
    assert httpx2.post(url, json=alice, headers=auth["key-alice"]).status_code == 202
    wait_until(lambda: llm_one.traffic()["received"] == 3, 60)
    assert asked(llm_one) == ["hog", "alice", "bob"]


def places(
    broker: Broker, uids: list[str], timeout: float = 60
) -> dict[str, tuple[list[tuple[int, float]], float]]:
    """For each of ``uids``, read at once until ``[DONE]``: the places told
    (position, when it came) and when its first chunk came."""
    out = {}
    for uid, answer in collect(broker, uids, timeout).items():
        told = []
        for m in answer.messages:
            if m.kind == "queue":
                assert "seq" not in (m.properties.headers or {})
                assert m.json["object"] == "queue.status"
                told.append((int(m.json["position"]), m.at))
        first = next((m.at for m in answer.messages if m.kind == "chunk"), float("nan"))
        out[uid] = (told, first)
    return out


@pytest.mark.slow
def test_positions_count_the_starts_before_each_request(
    own_worker: WorkerFactory, worker_env: dict[str, str], names: dict[str, str], llm_one: DevLLM
) -> None:
    """Six requests wait behind a long answer, nothing else arrives: each one's
    positions never rise, end at 0 when its call starts, and each position
    told is the number of requests that start before it, plus one."""
    env = one_slot(worker_env, names, llm_one, "places")
    worker = own_worker("places", env=env)
    with client_of(env) as broker:
        hog = hog_the_slot(broker, llm_one)
        half_a_second = "m;tokens=10;delay=0.05"  # starts well apart, for the clocks below
        uids = send(
            broker, [chat(f"place-{i}", queue_updates=True, model=half_a_second) for i in range(6)]
        )
        told = places(broker, uids)
        assert broker.answer(hog).done
    starts = sorted(first for _, first in told.values())
    for i, uid in enumerate(uids):
        positions, first = told[uid]
        assert positions, about(f"{uid} told nothing", worker)()
        numbers = [p for p, _ in positions]
        assert numbers == sorted(numbers, reverse=True), numbers
        assert numbers[0] == i + 1, numbers  # the i requests before it, and the hog's end
        assert numbers[-1] == 0
        for position, at in positions[:-1]:
            started_since = sum(1 for s in starts if at < s < first)
            assert started_since == position - 1, (uid, position, started_since)


@pytest.mark.slow
def test_places_go_to_amqp_and_websocket_clients_that_ask_only(
    own_worker: WorkerFactory,
    own_web: WebFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    llm_one: DevLLM,
) -> None:
    """``queue_updates: true`` brings ``queue`` messages (no ``seq``) on AMQP
    and ``queue.status`` frames on the WebSocket; without it, a client sees
    only the numbered messages of its answer, as before."""
    env = one_slot(worker_env, names, llm_one, "ask")
    own_worker("ask", env=env)
    web = own_web("ask", env=env)
    with client_of(env) as broker:
        hog_the_slot(broker, llm_one)
        asking, quiet = send(broker, [chat("asking", queue_updates=True), chat("quiet")])
        loud = broker.answer(asking)
        silent = broker.answer(quiet)
        kinds = [m.kind for m in loud.messages]
        assert kinds[0] == "queue" and "queue" not in kinds[kinds.index("chunk") :]
        numbered = [m for m in loud.messages if m.kind != "queue"]
        assert [m.seq for m in numbered] == list(range(len(numbered)))
        assert "queue" not in [m.kind for m in silent.messages]
        assert [m.seq for m in silent.messages] == list(range(len(silent.messages)))

        hog_the_slot(broker, llm_one)
        ws = websocket.create_connection(ws_url(web), timeout=30)
        try:
            ws.send(ws_request("ws asking", queue_updates=True))
            frames = []
            while (frame := ws.recv()) != "[DONE]":
                frames.append(json.loads(frame))
            ws.send(ws_request("ws quiet"))
            quiet_frames = []
            while (frame := ws.recv()) != "[DONE]":
                quiet_frames.append(json.loads(frame))
        finally:
            ws.close()
    statuses = [f for f in frames if f.get("object") == "queue.status"]
    assert statuses and statuses[0]["position"] >= 1 and statuses[-1]["position"] == 0
    assert not [f for f in quiet_frames if f.get("object") == "queue.status"]


@pytest.mark.slow
def test_the_dispatcher_killed_loses_nothing_and_keeps_the_order(
    own_worker: WorkerFactory, worker_env: dict[str, str], names: dict[str, str], llm_one: DevLLM
) -> None:
    """kill -9 of the worker that dispatches, with ten requests waiting: the
    other worker gets the baton, and every request is answered, in the order
    they came."""
    env = one_slot(worker_env, names, llm_one, "baton")
    first = own_worker("baton-1", env=env)
    second = own_worker("baton-2", env=env)
    with client_of(env) as broker:
        hog = hog_the_slot(broker, llm_one)
        uids = send(broker, [chat(f"in line {i}") for i in range(10)])
        leader = wait_until(
            lambda: next(
                (w for w in (first, second) if "this worker dispatches" in w.output()), None
            ),
            10,
        )
        other = second if leader is first else first
        os.kill(leader.pid, signal.SIGKILL)
        answers = collect(broker, [hog, *uids], timeout=60)
    assert all(a.done for a in answers.values()), about("not answered", other)()
    assert "this worker dispatches" in other.output()
    waited = [p for p in asked(llm_one) if p.startswith("in line")]
    assert waited == [f"in line {i}" for i in range(10)]


@pytest.mark.slow
def test_service_tier_reaches_only_the_upstreams_that_take_it(
    own_worker: WorkerFactory,
    worker_env: dict[str, str],
    names: dict[str, str],
    llm_one: DevLLM,
    tmp_path: Path,
) -> None:
    """``forward_service_tier = true`` sends the request's tier on; an upstream
    without it never sees the field (most local servers refuse unknown fields)."""
    path = tmp_path / "upstreams.toml"
    path.write_text(
        "".join(
            f'[[upstream]]\nname = "{name}"\nurl = "{llm_one.base_url}"\napi_key = "none"\n'
            f'models = ["{name}-*"]\nmax_in_flight = 2\nforward_service_tier = {forward}\n\n'
            for name, forward in (("cloud", "true"), ("local", "false"))
        )
    )
    env = one_slot(worker_env, names, llm_one, "forward", UPSTREAMS_FILE=str(path))
    own_worker("forward", env=env)
    with client_of(env) as broker:
        uids = send(
            broker,
            [
                chat("to cloud", model="cloud-1", service_tier="priority"),
                chat("to local", model="local-1", service_tier="priority"),
            ],
        )
        assert all(a.done for a in collect(broker, uids, timeout=30).values())
    sent = {b["model"]: b for b in llm_one.stats()["last_requests"]}
    assert sent["cloud-1"]["service_tier"] == "priority"
    assert "service_tier" not in sent["local-1"]


@pytest.mark.slow
def test_the_order_is_the_same_on_quorum_queues(
    own_worker: WorkerFactory, worker_env: dict[str, str], names: dict[str, str], llm_one: DevLLM
) -> None:
    """With RABBITMQ_QUEUE_TYPE=quorum (no priorities on RabbitMQ 3.10's quorum
    queues): the tiers order the starts all the same."""
    env = one_slot(worker_env, names, llm_one, "quorum", RABBITMQ_QUEUE_TYPE="quorum")
    worker = own_worker("quorum", env=env)
    with client_of(env) as broker:
        hog = hog_the_slot(broker, llm_one)
        uids = send(
            broker,
            [
                chat("flex", service_tier="flex"),
                chat("plain"),
                chat("first", service_tier="priority"),
            ],
        )
        answers = collect(broker, [hog, *uids], timeout=60)
    assert all(a.done for a in answers.values()), about("not answered", worker)()
    assert asked(llm_one) == ["hog", "first", "plain", "flex"]
