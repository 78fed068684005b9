"""A drop-in stream or WebSocket answer whose client stops reading.

Their answers come to the web process's reply queue, consumed with no
acknowledgements and no prefetch: RabbitMQ pushes every message to the web
process as it is written.
What the client does not read waits in the web process, up to
``WEB_REPLY_BUFFER`` bytes of answer; past that the answer ends with an error
object (``reader_too_slow``) and its LLM call is cancelled, instead of the
process holding the whole answer (an SSE reader leaves its backlog in its
response queue: tests/test_lifecycle.py). The frames a slow WebSocket client
gets are whole, and one that takes none for two ping intervals is closed.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import gevent
import gevent.socket
import psutil
import pytest
import websocket
from openai import OpenAI

from config import load_settings
from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import Web, WebFactory, wait_until
from web.errors import ReaderTooSlow
from web.publisher import Replies, ReplyBook
from web.router import Delivery
from web.ws_limits import WholeWrites

BUFFER = 65536  # WEB_REPLY_BUFFER of the web front below
TOKENS = 400000
FIREHOSE = f"m;tokens={TOKENS};delay=0"
PROMPT = [{"role": "user", "content": "a flood"}]


@pytest.fixture(scope="module")
def small_buffer_web(start_web: WebFactory) -> Web:
    # Pings far apart: this client answers none while it does not read.
    return start_web("reply-buffer", WEB_REPLY_BUFFER=str(BUFFER), SSE_KEEPALIVE="60")


@pytest.fixture
def unread_socket(small_buffer_web: Web) -> Iterator[socket.socket]:
    """A client socket with a small receive buffer, connected to the web front."""
    host, port = small_buffer_web.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    yield client
    client.close()


def web_rss(web: Web) -> float:
    """MiB of resident memory of the web front's worker processes."""
    return sum(psutil.Process(pid).memory_info().rss for pid in web.worker_pids()) / 2**20


def wait_for_the_cancel(llm: DevLLM, before: dict[str, int], web: Web) -> None:
    """Wait, the client reading nothing, until the LLM call is cancelled (with
    no bound, the answer would run to its end, held by the web process)."""
    rss = web_rss(web)
    wait_until(
        lambda: llm.stats()["streams_cancelled"] > before["streams_cancelled"],
        60,
        lambda: f"the LLM call went on (the web process from {rss:.0f} to {web_rss(web):.0f} MiB)",
        interval=0.1,
    )


def read_to_the_end(client: socket.socket) -> bytes:
    client.settimeout(30)
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def assert_a_beginning_then_the_error(bodies: list[str]) -> None:
    chunks = [json.loads(body) for body in bodies[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert 0 < tokens < TOKENS // 10
    assert "".join(reply_tokens(PROMPT, tokens + 1)).startswith(text)
    error = json.loads(bodies[-1])["error"]
    assert error["code"] == "reader_too_slow", error


def test_a_drop_in_stream_not_read_is_cut_at_the_buffer(
    small_buffer_web: Web, llm: DevLLM, unread_socket: socket.socket
) -> None:
    body = json.dumps({"model": FIREHOSE, "stream": True, "messages": PROMPT}).encode()
    before = llm.stats()
    unread_socket.sendall(
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    wait_for_the_cancel(llm, before, small_buffer_web)
    received = read_to_the_end(unread_socket)
    events = [
        line.removeprefix(b"data: ") for line in received.split(b"\n") if line.startswith(b"data: ")
    ]
    # A true beginning of the answer, then the error (an OpenAI client raises
    # APIError on it); what the socket's buffers held, not 400,000 tokens.
    assert_a_beginning_then_the_error([e.decode() for e in events])


def flood_unread(web: Web, llm: DevLLM) -> websocket.WebSocket:
    """A WebSocket (with a small receive buffer) that asks for a flood of an
    answer and reads none of it, until its LLM call is cancelled."""
    url = web.url.replace("http://", "ws://") + "/v1/chat/ws"
    ws = websocket.create_connection(
        url, timeout=30, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    )
    try:
        before = llm.stats()
        ws.send(json.dumps({"model": FIREHOSE, "messages": PROMPT}))
        wait_for_the_cancel(llm, before, web)
    except BaseException:
        ws.close()
        raise
    return ws


def test_a_websocket_answer_not_read_is_cut_and_the_socket_serves_on(
    small_buffer_web: Web, llm: DevLLM
) -> None:
    ws = flood_unread(small_buffer_web, llm)
    try:
        frames = []
        while (frame := ws.recv()) != "[DONE]":
            frames.append(frame)
        assert_a_beginning_then_the_error(frames)
        # The socket is still good for the next request.
        ws.send(json.dumps({"model": "m;tokens=3", "messages": [{"role": "user", "content": "b"}]}))
        while (frame := ws.recv()) != "[DONE]":
            assert "error" not in json.loads(frame), frame
    finally:
        ws.close()


def test_a_websocket_client_that_takes_nothing_is_closed_without_a_traceback(
    web: Web, llm: DevLLM
) -> None:
    """With pings a second apart (this test run's SSE_KEEPALIVE), a client that
    takes no frame for two of them is taken for gone: its connection is shut,
    its LLM call cancelled, and the web process logs no failure."""
    ws = flood_unread(web, llm)
    try:
        deadline = time.monotonic() + 30
        ws.sock.settimeout(30)
        while ws.sock.recv(65536):  # what the buffers held, then the end
            assert time.monotonic() < deadline, "the connection was not closed"
    finally:
        ws.close()
    log = web.output()
    assert "the WebSocket handler failed" not in log
    assert "unexpected error" not in log


def test_one_completion_larger_than_the_buffer_comes_whole(small_buffer_web: Web) -> None:
    """The bound is on what waits unread: a client that waits for one large
    ``"stream": false`` completion gets it."""
    tokens = 20000
    with OpenAI(
        base_url=small_buffer_web.url + "/openai/v1", api_key="k", max_retries=0, timeout=60
    ) as client:
        completion = client.chat.completions.create(
            model=f"m;tokens={tokens};delay=0",
            messages=PROMPT,  # type: ignore[arg-type]
        )
    text = completion.choices[0].message.content or ""
    assert len(text) > BUFFER
    assert text == "".join(reply_tokens(PROMPT, tokens))


def test_a_callers_own_timeout_passes_through_a_whole_write() -> None:
    """A gevent.Timeout of the caller's, firing while a frame waits for a
    client that does not read, is the caller's: it is raised as itself, and
    the socket is not taken for a gone client (taken for the write's own, it
    would shut the socket and raise BrokenPipeError)."""
    server, client = gevent.socket.socketpair()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writes = WholeWrites(server, timeout=30)
        mine = gevent.Timeout(0.5)
        with pytest.raises(gevent.Timeout) as raised, mine:
            writes.send(b"x" * 8 * 2**20)  # more than the socket buffers hold
        assert raised.value is mine
        server.setblocking(False)
        server.send(b"")  # still open: a shut socket raises here
    finally:
        server.close()
        client.close()


def test_what_a_worker_writes_again_does_not_count_against_the_buffer() -> None:
    """A worker that lost its connection and went on writes again what it
    had written (``replay``, up to CARRY_ON_KEEP bytes at once), which the
    reader skips: a long answer's replay does not end it as reader_too_slow.
    What is new to the client counts as before."""
    settings = load_settings({"WEB_REPLY_BUFFER": "100"})
    replies = Replies(ReplyBook(settings), "u1", limit=100)
    chunk = "x" * 50
    for seq in range(10):
        replies.put(Delivery(chunk, "chunk", seq, replay=True))
    for seq in range(10, 13):  # 150 bytes unread: past the limit
        replies.put(Delivery(chunk, "chunk", seq))
    got = [replies.get(0) for _ in range(13)]
    assert [d.seq for d in got if d is not None] == list(range(13))
    for seq in range(13, 16):
        replies.put(Delivery(chunk, "chunk", seq))
    replies.put(Delivery(chunk, "chunk", 16))  # 150 bytes unread: past the limit
    with pytest.raises(ReaderTooSlow):  # what it held is dropped
        replies.get(0)
