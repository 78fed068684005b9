"""The web front over real HTTP: gunicorn from the Procfile line (gevent workers),
a real worker, RabbitMQ and the development LLM."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from devllm.testing import DevLLM
from tests.support import (
    Broker,
    EventStream,
    Web,
    WebFactory,
    about,
    chat,
    error_of,
    expected,
    fetch,
    new_uid,
    stream,
    submit,
    task_events,
    wait_until,
)

KNIGHT = "Tell me a short story about a brave knight."


def test_submit_then_read_with_curl(web: Web, broker: Broker) -> None:
    body = json.dumps(chat(KNIGHT, model="gpt-4o", stream=True, username="alice"))
    first = subprocess.run(
        ["curl", "-s", f"{web.url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    accepted = json.loads(first.stdout)
    uid = accepted["uid"]
    assert accepted["status"] == "queued"
    assert accepted["response_url"] == f"{web.url}/v1/chat/response?uid={uid}"

    second = subprocess.run(
        ["curl", "-sN", f"{web.url}/v1/chat/response?uid={uid}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    blocks = [b for b in second.stdout.split("\n\n") if b.strip()]
    events = [b for b in blocks if not b.startswith(":")]
    assert events[-1] == f"id: {len(events) - 1}\ndata: [DONE]"
    chunks = []
    for seq, block in enumerate(events[:-1]):
        id_line, data_line = block.split("\n")
        assert id_line == f"id: {seq}"
        chunks.append(json.loads(data_line.removeprefix("data: ")))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == expected(KNIGHT)
    # Delivered: the response queue is gone, and the uid cannot be read again.
    assert not broker.queue_exists(broker.response_queue(uid))
    again = stream(web, uid)
    assert again.status == 404
    assert error_of(again.body)["code"] == "unknown_uid"


def test_sse_streams_token_by_token_with_headers_and_keepalive(web: Web) -> None:
    # 1.5 s of silence after the role chunk (SSE_KEEPALIVE is 1 s), then a
    # token every 0.1 s: the events arrive spread out, as the LLM makes them.
    model = "m;first_delay=1.5;delay=0.1;tokens=8"
    uid = submit(web, chat("pace me", model=model))
    sse = stream(web, uid)
    assert sse.status == 200
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    assert sse.headers["Cache-Control"] == "no-cache"
    assert sse.headers["X-Accel-Buffering"] == "no"
    assert "ping" in sse.comments
    assert [e.id for e in sse.events] == [str(i) for i in range(len(sse.events))]
    assert sse.events[-1].data == "[DONE]"
    assert sse.content == expected("pace me", 8)
    content = [e for e in sse.events if e.data != "[DONE]" and e.json["choices"]
               and e.json["choices"][0]["delta"].get("content")]  # fmt: skip
    assert content[-1].at - content[0].at > 0.4, "the tokens came in one lump"


def test_simple_shape_and_own_uid(web: Web) -> None:
    uid = f"mine-{new_uid()}"
    status, _, raw = fetch(
        "POST", web.url + "/v1/chat/completions", {"key": uid, "message": "Say hello."}
    )
    assert status == 202
    assert json.loads(raw)["uid"] == uid
    assert stream(web, uid).content == "Hello!"


def test_a_uid_in_use_is_409_and_a_stream_has_one_reader(web: Web, broker: Broker) -> None:
    uid = new_uid()
    submit(web, chat("first", uid=uid, model="m;first_delay=2"))
    status, _, raw = fetch("POST", web.url + "/v1/chat/completions", chat("second", uid=uid))
    assert status == 409
    assert error_of(raw)["code"] == "uid_in_use"

    results: list[EventStream] = []
    reader = threading.Thread(target=lambda: results.append(stream(web, uid)))
    reader.start()
    queue = broker.response_queue(uid)
    broker.wait_for_queue(queue)
    wait_until(  # the first reader is consuming (exclusively)
        lambda: broker.consumer_count(queue) == 1, 10, about("no reader consumes", web)
    )
    second = stream(web, uid)
    reader.join(30)
    assert second.status == 409
    assert error_of(second.body)["code"] == "stream_in_use"
    assert results[0].content == expected("first")


def test_a_duplicate_is_409_while_the_worker_accepts_the_first(web: Web) -> None:
    """A uid is in use while its response queue holds an unread answer: a
    duplicate sent while the worker accepts the first is refused, and the
    first one is still answered."""
    for i in range(15):
        uid = new_uid()
        submit(web, chat(f"race {i}", uid=uid))
        for _ in range(3):
            status, _, raw = fetch("POST", web.url + "/v1/chat/completions", chat("dup", uid=uid))
            assert status == 409, raw
        assert stream(web, uid).content == expected(f"race {i}")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b"\xff\xfe", "invalid_encoding", None),
        (json.dumps({"model": "x"}).encode(), "missing_messages", "messages"),
        (json.dumps(chat("hi", uid="bad uid!")).encode(), "invalid_uid", "uid"),
        (json.dumps(chat("hi", stream="yes")).encode(), "invalid_type", "stream"),
        (json.dumps(chat("hi", temperature="hot")).encode(), "invalid_type", "temperature"),
    ],
)
def test_bad_bodies_are_400_error_objects(
    web: Web, body: bytes, code: str, param: str | None
) -> None:
    for path in ("/v1/chat/completions", "/openai/v1/chat/completions"):
        status, headers, raw = fetch("POST", web.url + path, body)
        assert status == 400, raw
        assert headers["Content-Type"] == "application/json"
        error = error_of(raw)
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            code,
            param,
        )


def test_a_body_too_large_is_413_before_it_is_read(web: Web) -> None:
    # MAX_BODY_BYTES is 1 MiB. Announced but never sent: the answer comes from
    # the Content-Length alone (a client still sending a big body may see its
    # connection closed under it, so the body is not sent here).
    for path in ("/v1/chat/completions", "/openai/v1/chat/completions"):
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1100000\r\n\r\n{".encode()
            )
            status, body = read_response(sock)
        assert status == 413
        assert error_of(body)["code"] == "body_too_large"
    # Chunked, with no length: cut off at the limit.
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 65536
        try:
            for _ in range(20):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed early
        status, _ = read_response(sock)
    assert status == 413


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP response with a Content-Length, from a raw socket."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (x.partition(": ") for x in lines[1:])
                  if k.lower() == "content-length")  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


def test_unknown_and_invalid_uids(web: Web) -> None:
    missing = stream(web, new_uid())
    assert missing.status == 404
    assert error_of(missing.body)["code"] == "unknown_uid"
    for query in ("", "?uid=", "?uid=has%20space", "?uid=" + "x" * 129):
        status, _, raw = fetch("GET", web.url + "/v1/chat/response" + query)
        assert status == 400
        assert error_of(raw)["param"] == "uid"
    status, _, raw = fetch("GET", web.url + "/no/such/route")
    assert status == 404
    assert error_of(raw)["code"] == "not_found"
    status, _, raw = fetch("GET", web.url + "/v1/chat/completions")
    assert status == 405
    assert error_of(raw)["code"] == "method_not_allowed"


def test_ping_and_healthz(web: Web) -> None:
    status, headers, raw = fetch("GET", web.url + "/ping")
    assert (status, raw) == (200, b"pong")
    assert headers["Content-Type"].startswith("text/plain")
    status, _, raw = fetch("GET", web.url + "/healthz")
    health = json.loads(raw)
    assert status == 200, health
    assert health["status"] == "ok"
    assert health["broker"]["ok"] is True
    assert health["llm"]["ok"] is True


def test_healthz_checks_at_most_once_in_two_seconds(web: Web) -> None:
    """A flood of /healthz makes the broker and the LLM work once, not per call."""
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: fetch("GET", web.url + "/healthz"), range(20)))
    assert all(status == 200 for status, _, _ in answers)
    stamps = {json.loads(raw)["checked_at"] for _, _, raw in answers}
    assert len(stamps) <= 2  # one check, or two if the flood straddled its expiry

    def checked_again() -> float:
        stamp = float(json.loads(fetch("GET", web.url + "/healthz")[2])["checked_at"])
        return stamp if stamp > max(stamps) else 0.0

    later = wait_until(checked_again, 10, "the checks were never made again", interval=0.2)
    # Not before HEALTH_CACHE (2 s) from the last check (its stamp rounded to 1 ms).
    assert later - max(stamps) >= 2.0 - 0.002, (later, stamps)


@pytest.mark.parametrize("when", ["mid-stream", "while the LLM is silent"])
def test_a_client_that_leaves_cancels_the_llm_call(
    web: Web, llm: DevLLM, broker: Broker, when: str
) -> None:
    # About 10 s of answer: only a cancel ends it sooner.
    if when == "mid-stream":
        model = "m;delay=0.2;tokens=50"
        hang_up = lambda sse: len(sse.events) >= 3  # noqa: E731
    else:
        model = "m;first_delay=10;tokens=5"
        hang_up = lambda sse: bool(sse.comments)  # noqa: E731
    before = llm.stats()["streams_cancelled"]
    uid = submit(web, chat(f"leave {when}", model=model))
    queue = broker.response_queue(uid)
    broker.wait_for_queue(queue)  # made by the worker as it accepts the request
    sse = stream(web, uid, until=hang_up)
    assert sse.status == 200
    assert sse.events[-1].data != "[DONE]" if sse.events else sse.comments == ["ping"]
    left = time.monotonic()
    wait_until(
        lambda: llm.stats()["streams_cancelled"] > before,
        10,
        about("the LLM stream was not cancelled", web),
    )
    assert time.monotonic() - left < 5
    wait_until(lambda: not broker.queue_exists(queue), 10, "the response queue is still there")
    assert f"uid={uid}: client left" in web.output()


def test_200_concurrent_sse_clients_through_one_worker_process(web: Web, llm: DevLLM) -> None:
    assert len(web.worker_pids()) == 1  # WEB_CONCURRENCY defaults to one gevent process
    n = 200
    # 2 s of silence before the first token (under LLM_READ_TIMEOUT), then
    # 1 s of tokens: every stream is open at once.
    model = "m;first_delay=2;delay=0.05;tokens=20"
    results: dict[int, EventStream] = {}

    def read(i: int) -> None:
        uid = submit(web, chat(f"client {i}", model=model))
        results[i] = stream(web, uid, timeout=60)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == n
    spans = []
    for i in range(n):
        sse = results[i]
        assert sse.status == 200
        assert sse.events[-1].data == "[DONE]", f"stream {i} incomplete"
        assert sse.content == expected(f"client {i}", 20), f"stream {i} differs"
        spans.append((sse.opened, sse.events[-1].at))
    # Every request was open at the moment the last one was sent.
    last_start = max(start for start, _ in spans)
    assert sum(1 for start, end in spans if start <= last_start <= end) == n
    assert len(web.worker_pids()) == 1


def test_broker_down_is_503(down_web: Web) -> None:
    status, _, raw = fetch("GET", down_web.url + "/ping")
    assert (status, raw) == (200, b"pong")
    status, _, raw = fetch("POST", down_web.url + "/v1/chat/completions", chat("hi"), timeout=60)
    assert status == 503, raw
    assert error_of(raw)["code"] == "broker_unavailable"
    sse = stream(down_web, new_uid(), timeout=60)
    assert sse.status == 503
    assert error_of(sse.body)["code"] == "broker_unavailable"
    status, _, raw = fetch("GET", down_web.url + "/healthz", timeout=60)
    assert status == 503
    health = json.loads(raw)
    assert health["status"] == "unavailable"
    assert health["broker"]["ok"] is False
    assert health["llm"]["ok"] is True


def test_streams_spread_over_more_broker_connections(start_web: WebFactory) -> None:
    """With two streams per connection, six at once need three connections."""
    small = start_web("links", WEB_STREAMS_PER_CONNECTION="2")
    try:
        model = "m;first_delay=1;delay=0.02;tokens=6"
        results: dict[int, EventStream] = {}

        def read(i: int) -> None:
            results[i] = stream(small, submit(small, chat(f"link {i}", model=model)))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i in range(6):
            assert results[i].content == expected(f"link {i}", 6)
        assert "response-link-3: connected (up to 2 streams)" in small.output()
    finally:
        small.stop()


def test_flower_shows_no_prompt(web: Web, web_env: dict[str, str]) -> None:
    """The events of a submitted request sum it up: no prompt; the kwargs name
    the incarnation (rid) and nothing secret."""
    uid = new_uid()
    events = task_events(
        web_env["RABBITMQ_URL"], uid, lambda: submit(web, chat("a secret prompt", uid=uid))
    )
    received = next(e for e in events if e["type"] == "task-received")
    assert "messages=1" in received["args"] and "secret" not in received["args"]
    assert "'rid':" in received["kwargs"] and "token" not in received["kwargs"]
    assert stream(web, uid).content == expected("a secret prompt")
