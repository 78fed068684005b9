"""A broker restart under the web front: a stream being read breaks off with an
error event (the answer is neither cancelled nor deleted), reading the uid again
goes on to ``[DONE]``, and the same web process serves new requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import pytest

from devllm.answers import reply_tokens
from tests.support import EventStream, Web, fetch, read_sse

RABBITMQCTL = shutil.which("rabbitmqctl")


def rabbitmqctl(*args: str) -> None:
    assert RABBITMQCTL
    subprocess.run([RABBITMQCTL, *args], check=True, capture_output=True, timeout=120)


def content(events: list[str]) -> str:
    return "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or ""
        for e in events
        if e != "[DONE]" and json.loads(e).get("choices")
    )


@pytest.mark.skipif(RABBITMQCTL is None, reason="needs rabbitmqctl on the broker's machine")
def test_a_broker_restart_mid_stream(web: Web) -> None:
    pid = web.worker_pids()
    prompt = "a stream across a broker restart"
    body = {"model": "m;delay=0.15;tokens=40", "messages": [{"role": "user", "content": prompt}]}
    status, _, raw = fetch("POST", web.url + "/v1/chat/completions", body)
    assert status == 202
    uid = json.loads(raw)["uid"]
    url = f"{web.url}/v1/chat/response?uid={uid}"

    progress = threading.Event()
    first: list[EventStream] = []

    def seen_three(sse: EventStream) -> bool:
        if len(sse.events) >= 3:
            progress.set()
        return False

    reader = threading.Thread(target=lambda: first.append(read_sse(url, until=seen_three)))
    reader.start()
    assert progress.wait(30), "the stream never started"
    rabbitmqctl("stop_app")
    rabbitmqctl("start_app")
    reader.join(60)
    broken = first[0]
    assert broken.events[-1].data != "[DONE]"
    assert json.loads(broken.events[-1].data)["error"]["code"] == "broker_unavailable"

    # The answer was left alone: reading again goes on (once the broker is back).
    deadline = time.monotonic() + 90
    while True:
        again = read_sse(url, timeout=60)
        if again.status == 200:
            break
        assert again.status == 503, again.body
        assert time.monotonic() < deadline, "the web front never read the stream again"
        time.sleep(0.5)
    assert again.events[-1].data == "[DONE]"
    events = [e.data for e in broken.events[:-1]] + [e.data for e in again.events]
    ids = [e.id for e in broken.events[:-1]] + [e.id for e in again.events]
    # A worker that restarted the answer began again at id 0: the answer is
    # what follows the last id 0, or everything if it was not restarted.
    start = len(ids) - 1 - ids[::-1].index("0")
    expected = "".join(reply_tokens([{"role": "user", "content": prompt}], 40))
    assert content(events[start:]) == expected

    # The same web process goes on: submitting and reading work again.
    status, _, raw = fetch("POST", web.url + "/v1/chat/completions", body | {"model": "gpt-4o"})
    assert status == 202, raw
    assert (
        read_sse(f"{web.url}/v1/chat/response?uid={json.loads(raw)['uid']}").events[-1].data
        == "[DONE]"
    )
    assert web.worker_pids() == pid
