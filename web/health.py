"""``GET /ping`` (is the process up) and ``GET /healthz`` (can it work).

``/healthz`` connects to the broker and asks each upstream (the LLM servers)
for its models: work on all of them for every call; healthy when the broker
and at least one upstream answer, each upstream's answer listed. So one
check runs at a time per process, and its result is kept for
``HEALTH_CACHE`` seconds: a flood of calls costs the broker and the LLMs one
check each that long. The answer says when it was checked.
"""

from __future__ import annotations

import time
from typing import Any

import httpx2
from flask import Blueprint, Response, jsonify
from gevent.lock import Semaphore
from gevent.pool import Group

from web.router import connect
from web.services import services

bp = Blueprint("health", __name__)

CHECK_TIMEOUT = 3.0
HEALTH_CACHE = 2.0

_checking = Semaphore()
_last: tuple[float, dict[str, Any]] | None = None


@bp.get("/ping")
def ping() -> Response:
    return Response("pong", mimetype="text/plain")


def check_broker(url: str) -> dict[str, Any]:
    started = time.monotonic()
    try:
        connect(url, CHECK_TIMEOUT).release()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "seconds": round(time.monotonic() - started, 4)}


def check_llm(base_url: str, api_key: str) -> dict[str, Any]:
    """Reachable means it answers HTTP below 500 (even 401 or 404 prove it is there)."""
    started = time.monotonic()
    try:
        response = httpx2.get(
            base_url.rstrip("/") + "/models",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=CHECK_TIMEOUT,
        )
    except httpx2.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result: dict[str, Any] = {
        "ok": response.status_code < 500,
        "status": response.status_code,
        "seconds": round(time.monotonic() - started, 4),
    }
    return result


def checked() -> dict[str, Any]:
    """The checks, made now or at most HEALTH_CACHE seconds ago."""
    global _last  # noqa: PLW0603 - the one cache of this process
    with _checking:
        if _last is None or time.monotonic() - _last[0] > HEALTH_CACHE:
            settings = services().settings
            upstreams = settings.upstreams.all
            found = Group().map(lambda u: check_llm(u.url, u.api_key), upstreams)
            by_name = {u.name: result for u, result in zip(upstreams, found, strict=True)}
            checks = {
                "broker": check_broker(settings.rabbitmq_url),
                # Some LLM answers: requests for the others fail, or wait for a fallback.
                "llm": {"ok": any(r["ok"] for r in found)},
                "upstreams": by_name,
                "checked_at": round(time.time(), 3),
            }
            _last = (time.monotonic(), checks)
        return _last[1]


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    checks = checked()
    healthy = checks["broker"]["ok"] and checks["llm"]["ok"]
    return jsonify(status="ok" if healthy else "unavailable", **checks), 200 if healthy else 503
