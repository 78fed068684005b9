"""The development LLM, over a real socket, with the real openai SDK."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx2
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionChunk

from devllm.answers import CANNED, reply_tokens, tokenize
from devllm.behaviour import Behaviour, BehaviourError
from devllm.settings import Over
from devllm.standby import is_loopback
from devllm.testing import DevLLM, DevLLMError

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CANNED_FRANCE = "The capital of France is Paris."
FILLER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Describe the sea in a few words."},
]
STORY = [{"role": "user", "content": "Tell me a short story about a brave knight."}]
TOKENS = 12  # the server's default --tokens


@pytest.fixture(scope="module")
def llm() -> Iterator[DevLLM]:
    with DevLLM(token_delay=0.005) as server:
        assert server.tokens == TOKENS
        yield server


@pytest.fixture
def client(llm: DevLLM) -> Iterator[OpenAI]:
    with OpenAI(base_url=llm.base_url, api_key="test", max_retries=0, timeout=10) as c:
        yield c


def tag() -> str:
    return uuid.uuid4().hex[:8]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def content_chunks(chunks: list[ChatCompletionChunk]) -> int:
    return sum(1 for c in chunks if c.choices and c.choices[0].delta.content)


def post_raw(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


# --- answers and model strings, in process -------------------------------------------------


def test_canned_answers() -> None:
    assert "".join(reply_tokens(FRANCE, TOKENS)) == "The capital of France is Paris."
    assert reply_tokens(FRANCE, TOKENS)[:2] == ["The", " capital"]
    assert 35 <= len(reply_tokens(STORY, TOKENS)) <= 50
    joke = [{"role": "user", "content": "  tell me a JOKE. "}]
    assert "".join(reply_tokens(joke, 3)) == CANNED["tell me a joke."]


def test_filler_is_deterministic_and_sized() -> None:
    tokens = reply_tokens(FILLER, 20)
    assert len(tokens) == 20
    assert tokens == reply_tokens(FILLER, 20)
    assert tokens[0][0].isupper() and all(t.startswith(" ") for t in tokens[1:])
    assert tokens[-1].endswith(".")
    assert tokenize("".join(tokens))[:19] == tokens[:19]
    other = [{"role": "user", "content": "Something else entirely."}]
    assert reply_tokens(other, 20) != tokens
    assert reply_tokens(FILLER, 0) == []
    # Pinned: the same in every process and on every machine (no salted hash()).
    assert "".join(reply_tokens([{"role": "user", "content": "hi"}], 4)) == (
        "".join(reply_tokens([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 4))
    )


def test_model_string_parsing() -> None:
    assert Behaviour.parse("gpt-4o") == Behaviour(name="gpt-4o")
    b = Behaviour.parse("gpt-4o;status=429;times=2;tag=abc;retry_after=0.5")
    assert (b.name, b.status, b.times, b.tag, b.retry_after) == ("gpt-4o", 429, 2, "abc", 0.5)
    b = Behaviour.parse("deepseek-r1:8b; fault=stall ;at=3;stall=1.5;")
    assert (b.name, b.fault, b.at, b.stall) == ("deepseek-r1:8b", "stall", 3, 1.5)
    bad_models = ["m;colour=red", "m;status=200", "m;tokens=-1", "m;fault=x", "m;delay=x", "m;at"]
    for bad in bad_models:
        with pytest.raises(BehaviourError):
            Behaviour.parse(bad)


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.1.2.3", "::1", "a.localhost"]))
    assert not any(map(is_loopback, ["example.com", "10.0.0.1", "0.0.0.0", "rabbitmq"]))


# --- chat completions over the socket ----------------------------------------------------


@pytest.mark.parametrize("messages", [FRANCE, FILLER, STORY], ids=["canned", "filler", "story"])
def test_stream_content_and_framing(client: OpenAI, messages: list[dict[str, Any]]) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    expected = reply_tokens(messages, TOKENS)
    assert content_of(chunks) == "".join(expected)
    assert content_chunks(chunks) == len(expected)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].delta.content is None
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_is_flushed_token_by_token(llm: DevLLM) -> None:
    body = json.dumps(
        {"model": "gpt-4o;delay=0.1;tokens=4", "messages": FILLER, "stream": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", llm.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: devllm\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        arrivals: list[tuple[float, bytes]] = []
        while data := sock.recv(65536):
            arrivals.append((time.monotonic(), data))
    raw = b"".join(data for _, data in arrivals)
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream" in head
    assert b"Transfer-Encoding: chunked" in head
    assert raw.count(b"data: ") == 1 + 4 + 1 + 1  # role, tokens, finish, [DONE]
    assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    # The four tokens arrive in separate reads, about 0.1 s apart: nothing is buffered.
    token_reads = [t for t, data in arrivals if b'"content":"' in data and b'"role"' not in data]
    assert len(token_reads) >= 4
    assert token_reads[-1] - token_reads[0] >= 0.25


def test_model_tokens_option(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="gpt-4o;tokens=30", messages=FILLER, stream=True)
    )
    assert content_of(chunks) == "".join(reply_tokens(FILLER, 30))


def test_non_streaming(client: OpenAI) -> None:
    completion = client.chat.completions.create(model="deepseek-r1:8b", messages=FRANCE)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "deepseek-r1:8b"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_cuts_with_length(client: OpenAI, stream: bool, field: str) -> None:
    expected = "".join(reply_tokens(STORY, TOKENS)[:5])
    options: dict[str, Any] = {field: 5}
    if stream:
        chunks = list(
            client.chat.completions.create(model="gpt-4o", messages=STORY, stream=True, **options)
        )
        assert content_of(chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        completion = client.chat.completions.create(model="gpt-4o", messages=STORY, **options)
        assert completion.choices[0].message.content == expected
        assert completion.choices[0].finish_reason == "length"


def test_include_usage(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=FRANCE,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert content_of(chunks) == "The capital of France is Paris."


def test_first_delay(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o;first_delay=0.4;delay=0", messages=FRANCE, stream=True
    )
    with stream:
        chunks = iter(stream)
        next(chunks)  # the role chunk comes at once
        started = time.monotonic()
        next(chunks)
        assert time.monotonic() - started >= 0.3


# --- errors on demand ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception", "code"),
    [
        (400, openai.BadRequestError, "invalid_request"),
        (401, openai.AuthenticationError, "invalid_api_key"),
        (403, openai.PermissionDeniedError, "permission_denied"),
        (404, openai.NotFoundError, "model_not_found"),
        (429, openai.RateLimitError, "rate_limit_exceeded"),
        (500, openai.InternalServerError, "internal_error"),
        (502, openai.InternalServerError, "bad_gateway"),
        (503, openai.InternalServerError, "service_unavailable"),
    ],
)
def test_status_on_demand(
    client: OpenAI, status: int, exception: type[openai.APIStatusError], code: str
) -> None:
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model=f"gpt-4o;status={status}", messages=FRANCE)
    assert caught.value.status_code == status
    assert caught.value.code == code
    assert isinstance(caught.value.body, dict) and caught.value.body["message"]


def test_429_headers_and_streaming(client: OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o;status=429", messages=FRANCE, stream=True)
    assert caught.value.response.headers["retry-after"] == "0"
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o;status=429;retry_after=2", messages=FRANCE)
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["retry-after-ms"] == "2000"


def test_times_fails_the_first_requests_only(client: OpenAI) -> None:
    model = f"gpt-4o;status=503;times=2;tag={tag()}"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=model, messages=FRANCE)
    completion = client.chat.completions.create(model=model, messages=FRANCE)
    assert completion.choices[0].message.content == "The capital of France is Paris."


def test_times_with_sdk_retries_succeeds(llm: DevLLM, client: OpenAI) -> None:
    model = f"gpt-4o;status=429;times=2;retry_after=0.05;tag={tag()}"
    chunks = list(
        client.with_options(max_retries=2).chat.completions.create(
            model=model, messages=FRANCE, stream=True
        )
    )
    assert content_of(chunks) == "The capital of France is Paris."
    sent = [r for r in llm.stats()["last_requests"] if r["model"] == model]
    assert len(sent) == 3


def test_invalid_requests(llm: DevLLM, client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o;colour=red", messages=FRANCE)
    assert caught.value.param == "model" and "colour" in caught.value.message
    url = llm.base_url + "/chat/completions"
    status, body = post_raw(url, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post_raw(url, json.dumps({"messages": FRANCE}).encode())
    assert (status, body["error"]["param"]) == (400, "model")
    status, body = post_raw(
        url, json.dumps({"model": "m", "messages": FRANCE, "max_tokens": 0}).encode()
    )
    assert (status, body["error"]["param"]) == (400, "max_tokens")
    status, body = post_raw(llm.url + "/v1/nothing-here", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"


# --- faults mid-stream --------------------------------------------------------------------


def test_disconnect_mid_stream(llm: DevLLM, client: OpenAI) -> None:
    llm.reset()
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        for chunk in client.chat.completions.create(
            model="gpt-4o;fault=disconnect;at=3", messages=FILLER, stream=True
        ):
            received.append(chunk)
    assert type(caught.value) is openai.APIConnectionError
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert content_chunks(received) == 3
    assert content_of(received) == "".join(reply_tokens(FILLER, TOKENS)[:3])
    assert llm.stats()["streams_faulted"] == 1


def test_disconnect_before_a_non_streaming_answer(client: OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as caught:
        client.chat.completions.create(model="gpt-4o;fault=disconnect", messages=FRANCE)
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)


def test_malformed_chunk(client: OpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    # The SDK lets json's own error through: it is not an openai.APIError.
    with pytest.raises(json.JSONDecodeError):
        for chunk in client.chat.completions.create(
            model="gpt-4o;fault=malformed;at=2", messages=FRANCE, stream=True
        ):
            received.append(chunk)
    assert content_of(received) == "The capital"
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model="gpt-4o;fault=malformed", messages=FRANCE)


def test_error_object_mid_stream(client: OpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(
            model="gpt-4o;fault=error;at=2", messages=FRANCE, stream=True
        ):
            received.append(chunk)
    assert content_of(received) == "The capital"
    assert caught.value.code == "model_error"
    whole = client.chat.completions.with_raw_response.create(
        model="gpt-4o;fault=error", messages=FRANCE
    )
    assert whole.status_code == 200
    assert json.loads(whole.text)["error"]["code"] == "model_error"


def raw_frames(llm: DevLLM, model: str, **extra: Any) -> list[bytes]:
    """The ``data:`` payloads of one streamed answer, read from a plain socket to its end."""
    body = json.dumps({"model": model, "messages": FILLER, "stream": True, **extra}).encode()
    with httpx2.Client(base_url=llm.url, timeout=10, trust_env=False) as http:
        response = http.post("/v1/chat/completions", content=body)
    assert response.status_code == 200
    return [
        line.removeprefix(b"data: ")
        for line in response.content.split(b"\n\n")
        if line.startswith(b"data: ")
    ]


@pytest.mark.parametrize(("fault", "done"), [("truncate", True), ("truncate_eof", False)])
def test_truncate_ends_cleanly_without_a_finish_reason(
    llm: DevLLM, client: OpenAI, fault: str, done: bool
) -> None:
    """The SDK sees a normal end; only the missing finish_reason tells."""
    llm.reset()
    chunks = list(
        client.chat.completions.create(
            model=f"gpt-4o;fault={fault};at=3", messages=FILLER, stream=True
        )
    )
    assert content_of(chunks) == "".join(reply_tokens(FILLER, TOKENS)[:3])
    assert all(c.choices[0].finish_reason is None for c in chunks)
    stats = llm.stats()
    assert (stats["streams_faulted"], stats["streams_completed"]) == (1, 0)
    frames = raw_frames(llm, f"gpt-4o;fault={fault};at=3")
    assert len(frames) == 1 + 3 + done  # role, three tokens, [DONE] or nothing
    assert (frames[-1] == b"[DONE]") is done


@pytest.mark.parametrize("fault", ["truncate", "truncate_eof"])
def test_truncate_keeps_the_usage_chunk(llm: DevLLM, fault: str) -> None:
    frames = raw_frames(llm, f"gpt-4o;fault={fault};at=0", stream_options={"include_usage": True})
    payloads = [json.loads(f) for f in frames if f != b"[DONE]"]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]
    assert all(c["finish_reason"] is None for p in payloads for c in p["choices"])
    assert len(payloads) == 2


def test_truncate_times_then_whole(client: OpenAI) -> None:
    model = f"gpt-4o;fault=truncate;at=0;times=1;tag={tag()}"
    first = list(client.chat.completions.create(model=model, messages=FRANCE, stream=True))
    assert content_of(first) == "" and first[-1].choices[0].finish_reason is None
    second = list(client.chat.completions.create(model=model, messages=FRANCE, stream=True))
    assert content_of(second) == "The capital of France is Paris."
    assert second[-1].choices[0].finish_reason == "stop"
    whole = client.chat.completions.create(model="gpt-4o;fault=truncate", messages=FRANCE)
    assert whole.choices[0].finish_reason == "stop"  # non-streaming answers are whole


def test_stall_before_a_non_streaming_answer(llm: DevLLM, client: OpenAI) -> None:
    llm.reset()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.4).chat.completions.create(
            model="gpt-4o;fault=stall", messages=FRANCE
        )
    wait_for(lambda: llm.stats()["requests_cancelled"] == 1)
    assert llm.stats()["errors"] == 0


def test_stall_times_out_and_is_seen_cancelled(llm: DevLLM, client: OpenAI) -> None:
    llm.reset()
    received: list[ChatCompletionChunk] = []
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        for chunk in client.with_options(timeout=0.5).chat.completions.create(
            model="gpt-4o;fault=stall;at=2", messages=FRANCE, stream=True
        ):
            received.append(chunk)
    assert 0.4 < time.monotonic() - started < 3
    assert content_of(received) == "The capital"
    # The server notices the client leaving during the stall, not an hour later.
    wait_for(lambda: llm.stats()["streams_cancelled"] == 1)
    assert llm.stats()["active_streams"] == 0


def test_hang_before_headers(client: OpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.4).chat.completions.create(
            model="gpt-4o;hang=30", messages=FRANCE, stream=True
        )
    assert time.monotonic() - started < 3


def test_client_closing_mid_stream_is_counted(llm: DevLLM, client: OpenAI) -> None:
    llm.reset()
    stream = client.chat.completions.create(
        model="gpt-4o;tokens=2000;delay=0.01", messages=FILLER, stream=True
    )
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    assert llm.stats()["active_streams"] == 1
    stream.close()
    wait_for(lambda: llm.stats()["streams_cancelled"] == 1)
    stats = llm.stats()
    assert stats["streams_started"] == 1
    assert stats["streams_completed"] == stats["active_streams"] == 0


# --- the other routes -------------------------------------------------------------------


def test_models_health_and_stats(llm: DevLLM, client: OpenAI) -> None:
    assert {"gpt-4o", "deepseek-r1:8b", "devllm"} <= {m.id for m in client.models.list()}
    llm.reset()
    client.chat.completions.create(
        model="gpt-4o", messages=FRANCE, temperature=0.25, user="u-1", max_tokens=50
    )
    list(client.chat.completions.create(model="gpt-4o", messages=FRANCE, stream=True))
    stats = llm.stats()
    assert stats["requests"] == 2
    assert (stats["streams_started"], stats["streams_completed"]) == (1, 1)
    first = stats["last_requests"][0]
    assert (first["temperature"], first["user"], first["max_tokens"]) == (0.25, "u-1", 50)
    assert first["messages"] == FRANCE
    assert stats["last_requests"][1]["stream"] is True
    llm.reset()
    assert llm.stats()["requests"] == 0 and llm.stats()["last_requests"] == []


def test_devllm_reports_a_failed_start() -> None:
    with pytest.raises(DevLLMError, match="tokens -1 must be a whole number"):
        DevLLM(tokens=-1).start()


def test_api_key() -> None:
    with DevLLM(api_key="sekret", token_delay=0) as llm:
        with OpenAI(base_url=llm.base_url, api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                client.chat.completions.create(model="gpt-4o", messages=FRANCE)
            assert caught.value.code == "invalid_api_key"
            assert caught.value.type == "authentication_error"
        with OpenAI(base_url=llm.base_url, api_key="sekret", max_retries=0) as client:
            completion = client.chat.completions.create(model="gpt-4o", messages=FRANCE)
            assert completion.choices[0].message.content == "The capital of France is Paris."
            assert client.models.list().data
        assert llm.stats()["requests"] == 2  # /_stats needs no key


# --- standby ---------------------------------------------------------------------------------


def test_standby_idles_when_an_llm_answers(llm: DevLLM) -> None:
    with DevLLM(standby=llm.base_url) as standby:
        assert standby.idle
        time.sleep(0.3)
        assert standby.running, standby.output()
    assert standby.returncode == 0
    assert f"an LLM answers at {llm.base_url}; the development LLM stays idle" in standby.output()


def test_standby_serves_when_nothing_answers() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://localhost:{port}/v1"
    with DevLLM(standby=url, token_delay=0) as standby:
        assert not standby.idle
        assert standby.port == port
        with OpenAI(base_url=url, api_key="unused", max_retries=0) as client:
            completion = client.chat.completions.create(model="gpt-4o", messages=FRANCE)
        assert completion.choices[0].message.content == "The capital of France is Paris."
    assert standby.returncode == 0
    assert f"no LLM answered at {url}: serving the chatqueue development LLM" in standby.output()


# --- load ------------------------------------------------------------------------------------


def test_300_concurrent_streams(llm: DevLLM) -> None:
    llm.reset()
    n = 300
    model = "gpt-4o;first_delay=1;delay=0.02;tokens=15"
    expected = "".join(reply_tokens(FILLER, 15))
    # Every client holds its stream open until all n have their first chunk: n at once.
    all_open = threading.Barrier(n)
    peak = 0
    with OpenAI(base_url=llm.base_url, api_key="test", max_retries=0, timeout=60) as client:

        def one(_: int) -> str:
            try:
                with client.chat.completions.create(
                    model=model, messages=FILLER, stream=True
                ) as stream:
                    chunks = iter(stream)
                    first = next(chunks)
                    all_open.wait(timeout=60)
                    return content_of([first, *chunks])
            except BaseException:
                all_open.abort()
                raise

        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(one, i) for i in range(n)]
            while not all(f.done() for f in futures):
                peak = max(peak, llm.stats()["active_streams"])
                time.sleep(0.05)
            results = [f.result() for f in futures]
    assert results == [expected] * n
    stats = llm.stats()
    assert stats["streams_completed"] == n
    assert stats["streams_cancelled"] == stats["active_streams"] == 0
    assert peak > 1


# --- capacity: --slots, --over and /stats -----------------------------------------------------

LONG = "gpt-4o;tokens=2000;delay=0.01"  # a stream that holds its slot until it is closed


@pytest.fixture(scope="module")
def http() -> Iterator[httpx2.Client]:
    """One client for all the :class:`Held` streams: each takes a connection of its pool."""
    with httpx2.Client(timeout=10, trust_env=False) as client:
        yield client


class Held:
    """One streamed request on a connection of its own, read frame by frame.

    Entering blocks until the response's headers arrive, so a queued request is
    entered in a thread.
    """

    def __init__(
        self, http: httpx2.Client, llm: DevLLM, model: str, messages: list[dict[str, Any]] = FILLER
    ) -> None:
        self._request = http.stream(
            "POST",
            llm.base_url + "/chat/completions",
            json={"model": model, "messages": messages, "stream": True},
        )

    def __enter__(self) -> Held:
        response = self._request.__enter__()
        self._lines = (line.removeprefix("data: ") for line in response.iter_lines() if line)
        return self

    def __exit__(self, *exc: object) -> None:
        self._request.__exit__(None, None, None)

    def frames(self, n: int) -> list[str]:
        """The next ``n`` ``data:`` payloads."""
        return [next(self._lines) for _ in range(n)]

    def rest(self) -> list[str]:
        """The payloads to the end of the body."""
        return list(self._lines)


def finish_reasons(payloads: list[str]) -> list[str | None]:
    return [
        choice["finish_reason"]
        for p in payloads
        if p != "[DONE]"
        for choice in json.loads(p)["choices"]
    ]


def payloads_content(payloads: list[str]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for p in payloads
        if p != "[DONE]"
        for choice in json.loads(p)["choices"]
    )


def whole_stream(llm: DevLLM, model: str, messages: list[dict[str, Any]] = FRANCE) -> str:
    """The content of one streamed answer, read to its end with the openai SDK."""
    with OpenAI(base_url=llm.base_url, api_key="t", max_retries=0, timeout=10) as client:
        chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    return content_of(chunks)


def test_slots_options_are_checked() -> None:
    with pytest.raises(DevLLMError, match="slots -1 must be a whole number"):
        DevLLM(slots=-1).start()
    assert Behaviour.parse("m;status=503;until=1767225600.5").until == 1767225600.5
    with pytest.raises(BehaviourError, match="until"):
        Behaviour.parse("m;until=soon")


def test_queue_serves_n_at_a_time_first_come_first_served(http: httpx2.Client) -> None:
    with DevLLM(slots=1, over="queue", token_delay=0.005) as llm, ThreadPoolExecutor(4) as pool:
        first_chunk: dict[str, float] = {}

        def waiter(name: str) -> str:
            with Held(http, llm, "gpt-4o", FRANCE) as held:
                held.frames(1)
                first_chunk[name] = time.monotonic()
                return payloads_content(held.rest())

        with Held(http, llm, LONG) as holder:
            holder.frames(3)
            assert llm.traffic()["in_flight"] == 1
            second = pool.submit(waiter, "second")
            wait_for(lambda: llm.traffic()["queued"] == 1)
            third = pool.submit(waiter, "third")
            wait_for(lambda: llm.traffic()["queued"] == 2)
            holder.frames(3)  # the holder still streams; the others still wait
            assert not second.done() and not third.done()
        # The holder left: its slot goes to the second, then to the third.
        assert second.result(timeout=10) == third.result(timeout=10) == CANNED_FRANCE
        assert first_chunk["second"] < first_chunk["third"]
        traffic = llm.traffic()
        assert (traffic["slots"], traffic["over"]) == (1, "queue")
        assert (traffic["max_in_flight"], traffic["in_flight"], traffic["queued"]) == (1, 0, 0)
        assert (traffic["received"], traffic["served"], traffic["cancelled"]) == (3, 2, 1)


def test_interrupt_cuts_the_oldest_stream(http: httpx2.Client) -> None:
    with DevLLM(slots=2, over="interrupt", token_delay=0.005) as llm:
        with Held(http, llm, LONG) as oldest, Held(http, llm, LONG) as newer:
            before = oldest.frames(3) + newer.frames(3)
            # A third request takes the oldest stream's slot at once.
            assert whole_stream(llm, "gpt-4o") == CANNED_FRANCE
            cut = oldest.rest()
            assert cut[-1] == "[DONE]"
            assert all(reason is None for reason in finish_reasons(before + cut))
            assert all(json.loads(p)["choices"] for p in cut[:-1])  # no usage chunk either
            assert len(cut) < 50  # it stopped at its next token, far from its 2000
            full = "".join(reply_tokens(FILLER, 2000))
            assert full.startswith(payloads_content(before[:3] + cut))
            assert len(newer.frames(20)) == 20  # the newer one goes on
            traffic = llm.traffic()
            assert (traffic["interrupted"], traffic["max_in_flight"]) == (1, 2)
        wait_for(lambda: llm.stats()["streams_cancelled"] == 1)  # the newer one, closed
        assert llm.stats()["streams_interrupted"] == 1


def test_interrupt_never_cuts_a_non_streamed_answer() -> None:
    with DevLLM(slots=1, over="interrupt", token_delay=0) as llm, ThreadPoolExecutor(2) as pool:
        with OpenAI(base_url=llm.base_url, api_key="t", max_retries=0, timeout=10) as client:
            whole = pool.submit(
                client.chat.completions.create, model="gpt-4o;first_delay=0.8", messages=FRANCE
            )
            wait_for(lambda: llm.traffic()["in_flight"] == 1)
            # It waits for the non-streamed answer instead, then cuts nothing.
            streamed = pool.submit(whole_stream, llm, "gpt-4o")
            wait_for(lambda: llm.traffic()["queued"] == 1)
            assert whole.result(timeout=10).choices[0].message.content == CANNED_FRANCE
            assert streamed.result(timeout=10) == CANNED_FRANCE
        traffic = llm.traffic()
        assert (traffic["interrupted"], traffic["max_in_flight"], traffic["served"]) == (0, 1, 2)


@pytest.mark.parametrize(
    ("over", "exception"), [("503", openai.InternalServerError), ("429", openai.RateLimitError)]
)
def test_over_refuses_at_once(
    over: Over, exception: type[openai.APIStatusError], http: httpx2.Client
) -> None:
    with (
        DevLLM(slots=1, over=over, retry_after=0.25, token_delay=0) as llm,
        OpenAI(base_url=llm.base_url, api_key="t", max_retries=0, timeout=10) as client,
    ):
        with Held(http, llm, LONG) as holder:
            holder.frames(2)
            for stream in (True, False):
                started = time.monotonic()
                with pytest.raises(exception) as caught:
                    client.chat.completions.create(model="gpt-4o", messages=FRANCE, stream=stream)
                assert time.monotonic() - started < 0.5
                assert caught.value.status_code == int(over)
                assert "slots of devllm are busy" in caught.value.message
                headers = caught.value.response.headers
                if over == "429":
                    assert caught.value.code == "rate_limit_exceeded"
                    assert (headers["retry-after"], headers["retry-after-ms"]) == ("0.25", "250")
                else:
                    assert caught.value.code == "service_unavailable"
                    assert "retry-after" not in headers
        # The holder left, its slot is free again.
        wait_for(lambda: llm.traffic()["in_flight"] == 0)
        assert whole_stream(llm, "gpt-4o") == CANNED_FRANCE
        traffic = llm.traffic()
        assert traffic["refused"] == {"429": 0, "503": 0, over: 2}
        assert (traffic["received"], traffic["served"], traffic["max_in_flight"]) == (4, 1, 1)


def test_max_in_flight_under_concurrent_clients() -> None:
    n, slots = 9, 3
    model = "gpt-4o;tokens=5;delay=0.05"  # 0.25 s an answer: three rounds of three
    expected = "".join(reply_tokens(FILLER, 5))
    all_ready = threading.Barrier(n)
    with (
        DevLLM(slots=slots, over="queue") as llm,
        OpenAI(base_url=llm.base_url, api_key="t", max_retries=0, timeout=30) as client,
        ThreadPoolExecutor(n) as pool,
    ):

        def one(i: int) -> str:
            all_ready.wait(timeout=10)
            if i % 2:  # streamed and non-streamed requests take slots alike
                chunks = list(
                    client.chat.completions.create(model=model, messages=FILLER, stream=True)
                )
                return content_of(chunks)
            completion = client.chat.completions.create(model=model, messages=FILLER)
            return completion.choices[0].message.content or ""

        futures = [pool.submit(one, i) for i in range(n)]
        seen: list[dict[str, Any]] = []
        while not all(f.done() for f in futures):
            seen.append(llm.traffic())
        assert [f.result() for f in futures] == [expected] * n
        traffic = llm.traffic()
        assert traffic["max_in_flight"] == slots
        assert max(t["in_flight"] for t in seen) == slots
        assert max(t["queued"] for t in seen) > 0
        assert (traffic["received"], traffic["served"], traffic["in_flight"]) == (n, n, 0)


def test_max_in_flight_without_a_limit(llm: DevLLM, http: httpx2.Client) -> None:
    n = 20
    llm.reset()
    with ExitStack() as stack:
        for held in [stack.enter_context(Held(http, llm, LONG)) for _ in range(n)]:
            held.frames(1)
        traffic = llm.traffic()
        assert (traffic["slots"], traffic["in_flight"], traffic["max_in_flight"]) == (0, n, n)
    wait_for(lambda: llm.traffic()["in_flight"] == 0)
    assert llm.traffic()["max_in_flight"] == n


# A client in a process of its own: it sends a request, says "sent", then waits
# to be killed.
KILLED_CLIENT = """
import json, socket, sys, time
port, model, stream = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
body = json.dumps({"model": model, "stream": stream,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
sock = socket.create_connection(("127.0.0.1", port))
head = b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: devllm\\r\\nContent-Length: %d\\r\\n"
sock.sendall(head % len(body) + b"Content-Type: application/json\\r\\n\\r\\n" + body)
print("sent", flush=True)
time.sleep(60)
"""


@contextmanager
def killed_client(llm: DevLLM, model: str, stream: bool) -> Iterator[Callable[[], None]]:
    """Start a :data:`KILLED_CLIENT` process; yield the function that SIGKILLs it."""
    args = [sys.executable, "-c", KILLED_CLIENT, str(llm.port), model, str(int(stream))]
    with subprocess.Popen(args, stdout=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None and process.stdout.readline() == b"sent\n"
            yield process.kill
        finally:
            process.kill()


@pytest.mark.parametrize(
    ("model", "stream", "phase"),
    [
        ("gpt-4o;tokens=1000;delay=0.3", True, "between tokens"),
        ("gpt-4o;first_delay=30", True, "in a long pause"),
        ("gpt-4o;tokens=1000;delay=0.3", False, "before a whole answer"),
        ("gpt-4o;hang=30", True, "while hung"),
    ],
    ids=["tokens", "pause", "whole", "hang"],
)
def test_a_killed_client_frees_its_slot(model: str, stream: bool, phase: str) -> None:
    with DevLLM(slots=1, over="queue", token_delay=0) as llm:
        with killed_client(llm, model, stream) as kill:
            wait_for(lambda: llm.traffic()["in_flight"] == 1)
            kill()
            killed = time.monotonic()
            wait_for(lambda: llm.traffic()["in_flight"] == 0, timeout=5)
            # At the next token at the latest: a failed write would take two.
            assert time.monotonic() - killed < 0.55, phase
        assert llm.traffic()["cancelled"] == 1
        assert whole_stream(llm, "gpt-4o") == CANNED_FRANCE


def test_a_client_leaving_the_queue_frees_its_place(http: httpx2.Client) -> None:
    with DevLLM(slots=1, over="queue", token_delay=0) as llm:
        with Held(http, llm, LONG) as holder:
            holder.frames(2)
            with killed_client(llm, "gpt-4o", stream=True) as kill:
                wait_for(lambda: llm.traffic()["queued"] == 1)
                kill()
                wait_for(lambda: llm.traffic()["queued"] == 0, timeout=1)
            assert llm.traffic()["in_flight"] == 1  # the holder keeps its slot
        assert whole_stream(llm, "gpt-4o") == CANNED_FRANCE
        traffic = llm.traffic()
        assert (traffic["received"], traffic["served"], traffic["cancelled"]) == (3, 1, 2)


def test_stats_received_log_and_reset(llm: DevLLM, client: OpenAI, http: httpx2.Client) -> None:
    llm.reset()
    before = time.time()
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    middle = time.time()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o;status=503", messages=FRANCE)
    after = time.time()
    traffic = llm.traffic()
    log = traffic["received_log"]
    assert len(log) == traffic["received"] == 4
    assert before <= log[0] <= log[1] <= log[2] <= middle <= log[3] <= after
    assert llm.traffic(since=middle)["received_log"] == log[3:]
    assert (traffic["served"], traffic["on_demand"], traffic["in_flight"]) == (3, {"503": 1}, 0)
    with Held(http, llm, LONG) as held:
        held.frames(1)
        llm.reset()
        traffic = llm.traffic()
        assert (traffic["received"], traffic["served"], traffic["received_log"]) == (0, 0, [])
        assert traffic["on_demand"] == {} and traffic["refused"] == {"429": 0, "503": 0}
        # The gauge keeps counting the stream still open; the peak starts from it.
        assert (traffic["in_flight"], traffic["max_in_flight"]) == (1, 1)
    status, body = post_raw(llm.url + "/stats/reset", b"")
    assert status == 200 and body["received"] == 0


def test_429_on_demand_for_a_window_takes_no_slot(http: httpx2.Client) -> None:
    with (
        DevLLM(slots=1, over="queue", token_delay=0) as llm,
        OpenAI(base_url=llm.base_url, api_key="t", max_retries=0, timeout=10) as client,
    ):
        until = time.time() + 0.5
        model = f"gpt-4o;status=429;retry_after=2;until={until}"
        with Held(http, llm, LONG) as holder:
            holder.frames(1)
            for _ in range(2):  # answered at once, though the one slot is busy
                with pytest.raises(openai.RateLimitError) as caught:
                    client.chat.completions.create(model=model, messages=FRANCE)
                headers = caught.value.response.headers
                assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "2000")
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model=f"gpt-4o;status=503;until={until}", messages=FRANCE
                )
            traffic = llm.traffic()
            assert (traffic["on_demand"], traffic["queued"]) == ({"429": 2, "503": 1}, 0)
        wait_for(lambda: time.time() > until)
        # Past the window the same model string is answered normally.
        completion = client.chat.completions.create(model=model, messages=FRANCE)
        assert completion.choices[0].message.content == CANNED_FRANCE
