"""WebSocket ``/v1/chat/ws`` with a real WebSocket client (websocket-client)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import websocket

from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import (
    Broker,
    Web,
    about,
    content_of,
    new_uid,
    receive_all,
    wait_until,
    ws_request,
    ws_url,
)


@pytest.fixture
def ws(web: Web) -> Iterator[websocket.WebSocket]:
    connection = websocket.create_connection(ws_url(web), timeout=30)
    yield connection
    connection.close()


def test_a_request_streams_back_frame_by_frame(ws: websocket.WebSocket, broker: Broker) -> None:
    uid = new_uid()
    ws.send(ws_request("What is the capital of France?", uid=uid, model="gpt-4o"))
    frames = receive_all(ws)
    assert frames[-1] == "[DONE]"
    assert {json.loads(f)["object"] for f in frames[:-1]} == {"chat.completion.chunk"}
    assert content_of(frames) == "The capital of France is Paris."
    assert not broker.queue_exists(broker.response_queue(uid))


def test_several_requests_on_one_socket(ws: websocket.WebSocket) -> None:
    for prompt in ("Tell me a joke.", "Say hello.", "a filler prompt"):
        ws.send(ws_request(prompt))
        expected = "".join(reply_tokens([{"role": "user", "content": prompt}], 12))
        assert content_of(receive_all(ws)) == expected
    ws.send(ws_request("What is the capital of France?", stream=False))
    frames = receive_all(ws)
    assert len(frames) == 2
    completion = json.loads(frames[0])
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "The capital of France is Paris."


def test_a_bad_request_gets_an_error_object_and_done(ws: websocket.WebSocket) -> None:
    ws.send("{not json")
    error, done = ws.recv(), ws.recv()
    assert json.loads(error)["error"]["code"] == "invalid_json"
    assert done == "[DONE]"
    ws.send(json.dumps({"messages": "nope"}))
    assert json.loads(ws.recv())["error"]["param"] == "messages"
    assert ws.recv() == "[DONE]"
    ws.send(ws_request("still usable after errors"))
    assert receive_all(ws)[-1] == "[DONE]"


def test_an_llm_error_comes_as_an_error_frame(ws: websocket.WebSocket) -> None:
    ws.send(ws_request("hi", model="m;status=404"))
    frames = receive_all(ws)
    assert len(frames) == 2
    assert json.loads(frames[0])["error"]["code"] == "model_not_found"


def test_closing_mid_answer_cancels_the_llm_call(web: Web, llm: DevLLM, broker: Broker) -> None:
    before = llm.stats()["streams_cancelled"]
    uid = new_uid()
    ws = websocket.create_connection(ws_url(web), timeout=30)
    ws.send(ws_request("a long answer", uid=uid, model="m;delay=0.2;tokens=50"))
    for _ in range(3):
        assert ws.recv() != "[DONE]"
    ws.close()
    wait_until(
        lambda: llm.stats()["streams_cancelled"] > before,
        10,
        about("the LLM call was not cancelled", web),
    )
    wait_until(
        lambda: not broker.queue_exists(broker.response_queue(uid)),
        10,
        "the response queue is still there",
    )


def test_api_keys_on_the_websocket(keyed_web: Web) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(ws_url(keyed_web), timeout=10)
    assert refused.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as wrong:
        websocket.create_connection(
            ws_url(keyed_web), timeout=10, header=["Authorization: Bearer nope"]
        )
    assert wrong.value.status_code == 401
    # A header, or (for browsers, which cannot send one) ?api_key=.
    for url, header in (
        (ws_url(keyed_web), ["Authorization: Bearer key-alice"]),
        (ws_url(keyed_web, "?api_key=key-bob"), []),
    ):
        ws = websocket.create_connection(url, timeout=30, header=header)
        ws.send(ws_request("Say hello."))
        assert content_of(receive_all(ws)) == "Hello!"
        ws.close()


def close_code(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read until the server's close frame: its status code and reason."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big"), data[2:].decode()


def test_a_frame_over_max_body_bytes_closes_the_socket_1009(web: Web) -> None:
    ws = websocket.create_connection(ws_url(web), timeout=30)
    ws.send("x" * (1048576 + 1))  # MAX_BODY_BYTES + 1
    assert close_code(ws)[0] == 1009
    ws.shutdown()


def test_frames_sent_ahead_of_their_answers_are_bounded_1008(web: Web) -> None:
    """A client that sends while its answer streams may be a few frames ahead;
    beyond, the web process does not hold more of them: it closes the socket."""
    ws = websocket.create_connection(ws_url(web), timeout=30)
    ws.send(ws_request("a long answer", model="m;delay=0.2;tokens=50"))
    assert ws.recv() != "[DONE]"  # the answer streams...
    for i in range(12):  # ...and the client sends more than 8 frames meanwhile
        ws.send(ws_request(f"ahead {i}"))
    code, reason = close_code(ws)
    assert code == 1008, reason
    assert "frames" in reason
    ws.shutdown()
    # The process goes on serving others.
    other = websocket.create_connection(ws_url(web), timeout=30)
    other.send(ws_request("Say hello."))
    assert content_of(receive_all(other)) == "Hello!"
    other.close()
