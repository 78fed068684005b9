"""A drop-in stream and a WebSocket answer whose worker dies mid-answer end
with an error object, never with the answer a second worker starts again
sent after the first one's part (their clients cannot be told to drop it)."""

from __future__ import annotations

import json
import threading
from typing import Any

import openai
import pytest
import websocket
from openai import OpenAI

from devllm.answers import reply_tokens
from devllm.testing import DevLLM
from tests.support import (
    Web,
    WebFactory,
    about,
    isolated,
    new_uid,
    requests_for,
    wait_until,
    ws_request,
    ws_url,
)

TOKENS = 40
MODEL = f"m;delay=0.2;tokens={TOKENS}"  # 8 s an answer: the kill comes mid-way


def content(frame: str) -> str:
    """The text a chunk carries ("" for an opening chunk)."""
    choices = json.loads(frame).get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def read_until_done(ws: websocket.WebSocket, frames: list[str]) -> None:
    while (frame := ws.recv()) != "[DONE]":
        frames.append(frame)
    frames.append(frame)


@pytest.mark.slow  # it kills a worker mid-answer
def test_a_worker_death_mid_answer_ends_direct_replies_with_an_error(
    start_worker: Any,
    start_web: WebFactory,
    worker_env: dict[str, str],
    web_env: dict[str, str],
    names: dict[str, str],
) -> None:
    env = isolated(worker_env, names, "direct-restart")
    doomed = start_worker("doomed-direct", env=env)
    web = start_web("direct-restart", env=isolated(web_env, names, "direct-restart"))

    ws_prompt = [{"role": "user", "content": "a WebSocket answer cut by a dead worker"}]
    ws = websocket.create_connection(ws_url(web), timeout=30)
    ws.send(ws_request(ws_prompt[0]["content"], model=MODEL))

    sdk_prompt = [{"role": "user", "content": "a drop-in stream cut by a dead worker"}]
    client = OpenAI(base_url=web.url + "/openai/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=sdk_prompt,  # type: ignore[arg-type]
        stream=True,
    )
    sdk_text = ""
    chunks = iter(stream)
    while len(sdk_text.split()) < 3:
        chunk = next(chunks)
        sdk_text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    ws_frames = [ws.recv() for _ in range(4)]
    # Read on (the web front pings, and closes a socket that does not answer).
    ws_reader = threading.Thread(target=read_until_done, args=(ws, ws_frames), daemon=True)
    ws_reader.start()

    doomed.kill()  # SIGKILL mid-answer: RabbitMQ gives both task messages back
    rescuer = start_worker("rescuer-direct", env=env)

    with pytest.raises(openai.APIError) as raised:
        for chunk in chunks:
            sdk_text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert raised.value.code == "answer_restarted"
    ws_reader.join(60)
    ws.close()
    client.close()
    *ws_chunks, error, done = ws_frames
    assert done == "[DONE]"
    assert json.loads(error)["error"]["code"] == "answer_restarted"
    ws_text = "".join(content(f) for f in ws_chunks)

    # What each client had is the start of its answer, nothing after it.
    for text, prompt in ((sdk_text, sdk_prompt), (ws_text, ws_prompt)):
        whole = "".join(reply_tokens(prompt, TOKENS))
        assert text and whole.startswith(text), (text, whole)
        assert text != whole
    # The rescuer's runs, which nobody could read, were cancelled.
    wait_until(
        lambda: rescuer.output().count(": cancelled") == 2,
        30,
        about("the rescuer's runs were not cancelled", rescuer),
    )


def test_a_restart_before_the_first_token_reaches_a_drop_in_stream_whole(
    web: Web, llm: DevLLM
) -> None:
    """The worker asks the LLM again when its stream broke after the opening
    chunk, before any token: the drop-in client gets the whole answer."""
    model = f"m;fault=disconnect;at=0;times=1;tokens=20;tag={new_uid()}"
    prompt = [{"role": "user", "content": "an answer that opens twice"}]
    with OpenAI(base_url=web.url + "/openai/v1", api_key="unused", max_retries=0) as client:
        chunks = list(client.chat.completions.create(model=model, messages=prompt, stream=True))  # type: ignore[arg-type]
    assert requests_for(llm, model) == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        reply_tokens(prompt, 20)
    )
