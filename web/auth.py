"""Optional API keys (``API_KEYS``).

With keys set, every route but ``/ping``, ``/healthz`` and the playground's
static page needs ``Authorization: Bearer <key>`` (a browser's WebSocket cannot
send headers, so ``/v1/chat/ws`` also takes ``?api_key=<key>``). A request is
submitted under its key's *owner*, the SHA-256 of the key, which the uid's
claim keeps: a stream is readable only with the key that submitted it.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, request

from web.errors import Unauthorized

# Endpoints anyone may call: liveness, health, and the page with no data in it.
PUBLIC_ENDPOINTS = frozenset({"health.ping", "health.healthz", "playground.index", "static"})


def owner_of(key: str) -> str:
    """What a claim records of the key that submitted a request."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    if request.path == "/v1/chat/ws":
        return request.args.get("api_key") or None
    return None


def current_owner() -> str:
    """The owner of this request: the key's hash, or ``""`` without keys."""
    key = presented_key()
    return owner_of(key) if key else ""


def init_auth(app: Flask, api_keys: frozenset[str]) -> None:
    """Refuse, before any route runs, a request without a valid key."""
    if not api_keys:
        return
    digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in api_keys]

    @app.before_request
    def require_key() -> None:
        if request.endpoint in PUBLIC_ENDPOINTS:
            return
        key = presented_key()
        if key is None:
            raise Unauthorized(
                "no API key: send the header 'Authorization: Bearer <key>' with one of API_KEYS"
            )
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        # Compare with every key, in constant time each, so timing tells nothing.
        if not sum(hmac.compare_digest(digest, d) for d in digests):
            raise Unauthorized("incorrect API key provided")
