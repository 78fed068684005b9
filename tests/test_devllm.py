"""The development LLM, over a real socket, with the real openai SDK."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionChunk

from devllm.answers import CANNED, reply_tokens, tokenize
from devllm.behaviour import Behaviour, BehaviourError
from devllm.standby import is_loopback
from devllm.testing import DevLLM, DevLLMError

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
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
