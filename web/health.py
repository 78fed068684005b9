"""``GET /ping`` (is the process up) and ``GET /healthz`` (can it work)."""

from __future__ import annotations

import time
from typing import Any

import httpx2
from flask import Blueprint, Response, jsonify

from web.router import connect
from web.services import services

bp = Blueprint("health", __name__)

CHECK_TIMEOUT = 3.0


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


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    settings = services().settings
    checks = {
        "broker": check_broker(settings.rabbitmq_url),
        "llm": check_llm(settings.openai_url, settings.openai_api_key),
    }
    healthy = all(c["ok"] for c in checks.values())
    return jsonify(status="ok" if healthy else "unavailable", **checks), 200 if healthy else 503
