"""The chatqueue development LLM: an OpenAI-compatible server with canned answers.

No model runs here. The answers are deterministic (:mod:`devllm.answers`), paced
token by token, and the server misbehaves on demand, so tests and benchmarks
can exercise every path of a client of an LLM server. Run it with
``python -m devllm`` (see ``--help``); tests start it with
:class:`devllm.testing.DevLLM`.

Routes
------

``POST /v1/chat/completions``
    OpenAI Chat Completions, streaming (``"stream": true``: SSE frames
    ``data: <chat.completion.chunk>``, then ``data: [DONE]``) or not.
    ``max_tokens`` / ``max_completion_tokens`` cut the answer
    (``finish_reason: "length"``); ``stream_options.include_usage`` adds a
    final usage chunk with ``choices: []``.
``GET /v1/models``
    The OpenAI list of a few model ids (any model string is accepted anyway).
``GET /health``
    ``{"status": "ok"}``.
``GET /stats``
    The load and what became of the chat completions::

        {"slots": 2, "over": "queue", "in_flight": 1, "max_in_flight": 2,
         "queued": 0, "received": 9, "served": 6, "refused": {"429": 0, "503": 0},
         "interrupted": 0, "cancelled": 1, "on_demand": {"429": 2},
         "received_log": [1767225600.123, ...]}

    ``in_flight``: requests holding a slot now (see :mod:`devllm.slots`; counted
    with ``--slots 0`` too); ``max_in_flight``: the most at once since the start
    or the last reset; ``queued``: requests waiting for a slot now;
    ``received``: every ``POST /v1/chat/completions``, valid or not;
    ``served``: whole answers (a stream that ended with its ``finish_reason``
    and ``[DONE]``, a non-streamed ``chat.completion``); ``refused``: answered
    429 or 503 at once because every slot was busy (``--over 429``/``503``);
    ``interrupted``: streams cut by a newer request (``--over interrupt``);
    ``cancelled``: requests whose client left before the answer ended, queued
    or served; ``on_demand``: answers of ``status=CODE``, by status;
    ``received_log``: the wall-clock times (``time.time()``) of the last 10,000
    requests received, oldest first. ``GET /stats?since=T`` keeps only the times
    at or after ``T`` in ``received_log``.
``GET /_stats``
    Counters (``requests``, ``errors``, ``requests_cancelled`` (the client left
    before the answer began: while queued, hung or waiting for a non-streamed
    answer), ``streams_started``, ``streams_completed``, ``streams_cancelled``
    (the client left mid-stream), ``streams_faulted`` (``fault=disconnect``,
    ``error``, ``truncate`` or ``truncate_eof``), ``streams_interrupted``
    (``--over interrupt``), ``active_streams``, ``peak_active_streams``, the
    most open at once since the last reset) and ``last_requests``, the last 50
    request bodies.
``POST /stats/reset``, ``POST /_reset``
    The same reset: zero the counters of both, empty ``received_log`` and
    ``last_requests``, and forget the ``times=N`` counts. The gauges
    (``in_flight``, ``queued``, ``active_streams``) keep counting, and
    ``max_in_flight`` and ``peak_active_streams`` start again from them. Both
    answer ``/stats``'s body.

With ``--api-key KEY``, ``/v1/`` requires ``Authorization: Bearer KEY`` (401
otherwise); ``/health``, ``/stats`` and ``/_stats`` never do.

Capacity
--------

``--slots N`` serves at most N chat completions at a time, streamed or not;
``--over queue|interrupt|503|429`` says what a request that finds them all
busy gets: it waits its turn, cuts the oldest running stream, or is answered
503, or 429 with ``retry-after`` (``--retry-after``), at once. A request holds
its slot until its answer ends or its client leaves (noticed at the next token
at the latest). :mod:`devllm.slots` has the details. Requests refused for
their body or their API key, and ``status=CODE`` answers, take no slot.

Behaviour on demand: the model string
-------------------------------------

The model string is the one field every caller forwards, so it carries the
behaviour a test wants::

    name;key=value;key=value        e.g.  gpt-4o;status=429;times=2;tag=abc

A model without ``;`` behaves normally. Answers echo the whole string as
``model``. Unknown keys and bad values are answered with a 400 that says so.

``tokens=N``
    Length of the filler answer in tokens (default ``--tokens``). Prompts with
    a canned answer (see :data:`devllm.answers.CANNED`) keep it.
``delay=S``
    Seconds before each content chunk (default ``--token-delay``).
``first_delay=S``
    Seconds between the first chunk (headers and the role delta) and the
    first content chunk.
``hang=S``
    Seconds before sending anything, headers included: for client timeouts
    before the first token. The request holds its slot meanwhile (a long
    prompt), unless ``status`` is given too.
``status=CODE``
    Answer HTTP ``CODE`` (400-599) with an OpenAI error object: 400
    ``invalid_request_error``, 401 ``authentication_error`` /
    ``invalid_api_key``, 403 ``permission_error``, 404 ``model_not_found``,
    429 ``rate_limit_exceeded``, 500/502/503/504 ``server_error``... These
    answers take no slot, whatever ``--slots``: with ``until=T`` or
    ``times=N`` a test makes the server refuse for a while, as an overloaded
    server or a rate limiter in front of it would.
``retry_after=S``
    The ``retry-after`` (seconds) and ``retry-after-ms`` headers of the error
    answer: ``gpt-4o;status=429;retry_after=2`` answers 429 with
    ``retry-after: 2`` and ``retry-after-ms: 2000`` (also with other statuses,
    such as 503). A 429 has ``retry-after: 0`` unless this is given.
``fault=disconnect``
    After ``at`` content chunks, close the TCP connection abruptly: no
    terminating chunk, no ``[DONE]``; the client sees a protocol error. A
    non-streaming request is dropped before any answer.
``fault=stall``
    After ``at`` content chunks, send nothing for ``stall`` seconds (default
    3600) with the connection open, then go on. Non-streaming: wait, then answer.
``fault=malformed``
    After ``at`` content chunks, send ``data: {this is not json`` and go on.
    Non-streaming: the body is not JSON.
``fault=error``
    After ``at`` content chunks, send an error object as a ``data:`` payload
    (``{"error": {... "code": "model_error"}}``, as vLLM does when generation
    fails) and end the stream. Non-streaming: that object as a 200 body.
``fault=truncate``
    After ``at`` content chunks, end the stream cleanly but early: no chunk
    with a ``finish_reason``, the usage chunk if ``stream_options.include_usage``
    asks for it, then ``[DONE]``. The SDK sees a normal end; only the missing
    ``finish_reason`` tells. Non-streaming: answers normally.
``fault=truncate_eof``
    As ``truncate``, without ``[DONE]``: the HTTP body just ends (a clean
    end of the chunked encoding, not a dropped connection).
``at=K``
    Content chunks sent before the fault (default 0; past the end of the
    answer, the fault comes before the finish chunk).
``stall=S``
    Length of ``fault=stall`` in seconds.
``times=N``
    Only the first N requests carrying this exact model string fail
    (``hang``, ``status`` and ``fault`` apply to them); later ones succeed.
    Counted per full model string in this process, reset by ``/_reset``:
    ``gpt-4o;status=429;times=2`` answers 429, 429, then normally.
``until=T``
    Requests fail (``hang``, ``status`` and ``fault`` apply) only while the
    server's ``time.time()`` is before ``T``, later ones succeed: a window of
    refusals, whatever the number of requests. With ``times``, both must hold.
    ``f"gpt-4o;status=503;until={time.time() + 2}"`` answers 503 for two
    seconds, then normally; ``status=429;retry_after=1;until=...`` answers 429
    with ``retry-after: 1`` meanwhile.
``tag=X``
    Ignored: makes a model string, and so its ``times`` count, unique.
"""

from __future__ import annotations

import logging
import resource
import signal
import socket
from typing import Any

import gevent
from flask import Flask, Response, jsonify, request
from gevent.event import Event
from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer
from werkzeug.exceptions import HTTPException

from devllm.answers import count_prompt_tokens, reply_tokens
from devllm.behaviour import Behaviour, BehaviourError, Fault
from devllm.completions import (
    STREAMED_ERROR,
    ChatRequest,
    Completion,
    InvalidRequest,
    parse_request,
)
from devllm.connection import ENVIRON_KEY, ClientConnection
from devllm.errors import error_object
from devllm.settings import BACKLOG, Settings
from devllm.slots import Refused, Slot, Slots
from devllm.state import State
from devllm.streaming import stream

logger = logging.getLogger(__name__)

MODELS = ("gpt-4o", "gpt-4o-mini", "deepseek-r1:8b", "llama3.2", "devllm")
BANNER = "the chatqueue development LLM (canned answers, not a real model)"
# The status logged for a request whose client left before the answer (nginx's convention).
CLIENT_GONE = 499


def error_response(
    status: int,
    message: str | None = None,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = jsonify(error_object(status, message, code=code, param=param))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` in seconds (as HTTP has it) and ``retry-after-ms`` (as OpenAI adds)."""
    return {"retry-after": f"{seconds:g}", "retry-after-ms": str(round(seconds * 1000))}


def _on_demand_headers(behaviour: Behaviour, status: int) -> dict[str, str]:
    if behaviour.retry_after is not None:
        return retry_headers(behaviour.retry_after)
    return {"retry-after": "0"} if status == 429 else {}


def _refusal(settings: Settings, refused: Refused) -> Response:
    """The answer to a request that finds every slot busy (``--over 503`` or ``429``)."""
    busy = f"all {settings.slots} slots of devllm are busy (--slots {settings.slots})"
    if refused.status == 429:
        return error_response(
            429,
            f"Rate limit reached: {busy}; retry after {settings.retry_after:g} s.",
            headers=retry_headers(settings.retry_after),
        )
    return error_response(refused.status, f"Server busy, please try again: {busy}.")


def _client_gone() -> Response:
    return Response(b"", status=CLIENT_GONE)


def create_app(settings: Settings) -> Flask:
    """The Flask application of the development LLM (serve it with :func:`serve`)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    state = State()
    slots = Slots(settings.slots, settings.over, state)
    app.extensions["devllm.state"] = state
    app.extensions["devllm.slots"] = slots

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return error_response(status, exc.description, code=code)

    def unauthorized() -> Response | None:
        if settings.api_key is None:
            return None
        if request.headers.get("Authorization") == f"Bearer {settings.api_key}":
            return None
        return error_response(
            401, "Incorrect API key provided: send the one devllm was started with --api-key."
        )

    def traffic() -> Response:
        raw = request.args.get("since")
        try:
            since = None if raw is None else float(raw)
        except ValueError:
            return error_response(
                400, f"Invalid 'since': expected a time.time() value, got {raw!r}.", param="since"
            )
        return jsonify(slots=settings.slots, over=settings.over, **state.traffic(since))

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    @app.get("/stats")
    def stats() -> Response:
        return traffic()

    @app.post("/stats/reset")
    @app.post("/_reset")
    def reset() -> Response:
        state.reset()
        return traffic()

    @app.get("/_stats")
    def stream_stats() -> Response:
        return jsonify(state.snapshot())

    @app.get("/v1/models")
    def models() -> Response:
        if (denied := unauthorized()) is not None:
            return denied
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "devllm"} for m in MODELS]
        return jsonify(object="list", data=data)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = request.get_json(force=True, silent=True)
        state.request_received(body if body is not None else request.get_data(as_text=True))
        response = unauthorized()
        if response is None:
            connection = ClientConnection.from_environ(request.environ)
            response = _chat_completion(settings, state, slots, body, connection)
        if 400 <= response.status_code != CLIENT_GONE:
            state.count("errors")
        return response

    return app


def _chat_completion(
    settings: Settings, state: State, slots: Slots, body: Any, connection: ClientConnection
) -> Response:
    try:
        chat = parse_request(body)
        behaviour = Behaviour.parse(chat.model)
    except InvalidRequest as exc:
        return error_response(400, exc.message, code=exc.code, param=exc.param)
    except BehaviourError as exc:
        return error_response(400, str(exc), code="invalid_value", param="model")
    faulty = behaviour.may_fail and state.take_failure(chat.model, behaviour.times, behaviour.until)
    if faulty and behaviour.status is not None:
        # An error on demand takes no slot: it stands for a refusal, not for work.
        if behaviour.hang > 0 and connection.pause(behaviour.hang) == "gone":
            logger.info("model %r: the client left while the request hung", chat.model)
            state.count("requests_cancelled")
            return _client_gone()
        logger.info("model %r: answering status %d on demand", chat.model, behaviour.status)
        state.on_demand(behaviour.status)
        return error_response(
            behaviour.status,
            f"devllm answers {behaviour.status} on demand (model {chat.model!r}).",
            headers=_on_demand_headers(behaviour, behaviour.status),
        )
    try:
        slot = slots.acquire(connection, stream=chat.stream)
    except Refused as refused:
        logger.debug("model %r: refused with %d, every slot is busy", chat.model, refused.status)
        return _refusal(settings, refused)
    if slot is None:
        logger.info("model %r: the client left while waiting for a slot", chat.model)
        return _client_gone()
    try:
        response = _answer(
            settings, state, chat, behaviour, faulty=faulty, connection=connection, slot=slot
        )
    except BaseException:
        slot.release()
        raise
    return response


def _answer(
    settings: Settings,
    state: State,
    chat: ChatRequest,
    behaviour: Behaviour,
    *,
    faulty: bool,
    connection: ClientConnection,
    slot: Slot,
) -> Response:
    """The answer of a request that holds ``slot``; the slot is given back when it ends."""
    # Cut while hanging (--over interrupt), a stream still begins, and ends at once.
    if faulty and behaviour.hang > 0 and connection.pause(behaviour.hang, slot.cut) == "gone":
        logger.info("model %r: the client left while the request hung", chat.model)
        slot.release()
        state.count("requests_cancelled")
        return _client_gone()
    tokens = reply_tokens(
        chat.messages, settings.tokens if behaviour.tokens is None else behaviour.tokens
    )
    completion = Completion.new(
        chat.model, tokens, chat.max_tokens, count_prompt_tokens(chat.messages)
    )
    delay = settings.token_delay if behaviour.delay is None else behaviour.delay
    logger.debug("%s: model %r stream=%s", completion.id, chat.model, chat.stream)
    if chat.stream:
        frames = stream(
            completion,
            behaviour,
            delay=delay,
            faulty=faulty,
            include_usage=chat.include_usage,
            connection=connection,
            slot=slot,
            state=state,
        )
        response = Response(
            frames,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        # The stream gives its slot back when it ends; this covers a body never started.
        response.call_on_close(slot.release)
        return response
    fault = behaviour.fault if faulty else None
    try:
        return _whole(
            completion, behaviour, fault=fault, delay=delay, connection=connection, state=state
        )
    finally:
        slot.release()


def _whole(
    completion: Completion,
    behaviour: Behaviour,
    *,
    fault: Fault | None,
    delay: float,
    connection: ClientConnection,
    state: State,
) -> Response:
    """A non-streaming answer, after the time the stream would have taken."""
    seconds = behaviour.first_delay + delay * len(completion.tokens)
    if fault == "stall":
        seconds += behaviour.stall
    if connection.pause(seconds) == "gone":
        state.count("requests_cancelled")
        return _client_gone()
    if fault == "disconnect":
        logger.info("%s: dropping the connection before answering", completion.id)
        connection.drop()
        return _client_gone()
    if fault == "malformed":
        return Response(b"{this is not json", mimetype="application/json")
    if fault == "error":
        return jsonify(STREAMED_ERROR)
    state.count("served")
    return jsonify(completion.to_object())


class Handler(WSGIHandler):  # type: ignore[misc]
    """gevent.pywsgi's handler, exposing the client socket to the application.

    Each chunk is written as produced, so Nagle's algorithm is off: with it, a
    chunk written while the previous one is unacknowledged waits for the
    client's delayed ACK (40 ms on Linux) on a kept-alive connection.
    """

    def handle(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ[ENVIRON_KEY] = self.socket
        return environ


def _raise_file_limit(wanted: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(settings: Settings) -> None:
    """Serve :func:`create_app` with gevent.pywsgi until SIGTERM or SIGINT.

    Needs ``gevent.monkey.patch_all()`` (``python -m devllm`` does it first).
    """
    _raise_file_limit()
    server = WSGIServer(
        (settings.host, settings.port),
        create_app(settings),
        backlog=BACKLOG,
        handler_class=Handler,
        log=LoggingLogAdapter(logging.getLogger("devllm.access"), logging.DEBUG),
        error_log=LoggingLogAdapter(logging.getLogger("devllm.errors"), logging.ERROR),
    )
    server.start()
    url = f"http://{settings.host}:{server.server_port}/v1"
    logger.info(
        "%s listening on %s (token_delay=%gs tokens=%d api_key=%s slots=%s over=%s backlog=%d)",
        BANNER,
        url,
        settings.token_delay,
        settings.tokens,
        "required" if settings.api_key else "none",
        settings.slots or "unlimited",
        settings.over,
        BACKLOG,
    )
    wait_for_stop_signal()
    logger.info("stopping the development LLM at %s", url)
    server.stop(timeout=1)


def wait_for_stop_signal() -> None:
    """Block this greenlet until SIGTERM or SIGINT."""
    stop = Event()
    handlers = [
        gevent.signal_handler(signum, stop.set) for signum in (signal.SIGTERM, signal.SIGINT)
    ]
    try:
        # With a timeout: a signal watcher alone does not keep gevent's loop alive.
        while not stop.wait(timeout=3600):
            pass
    finally:
        for handler in handlers:
            handler.cancel()
