"""Optional API keys (``API_KEYS``).

With keys set, every route but ``/ping``, ``/healthz`` and the playground's
static page needs ``Authorization: Bearer <key>`` (a browser's WebSocket cannot
send headers, so ``/v1/chat/ws`` also takes ``?api_key=<key>``). The uid of a
request submitted with a key carries an HMAC of its random part under that key
(:func:`app.lifecycle.new_uid`): a stream is readable only with the key that
submitted it, checked without a broker lookup, and a uid that carries no such
tag is nobody's (:func:`may_read`).
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, current_app, request

from app.lifecycle import owned_by
from web.errors import Unauthorized

# Endpoints anyone may call: liveness, health, and the page with no data in it.
PUBLIC_ENDPOINTS = frozenset({"health.ping", "health.healthz", "playground.index", "static"})


def presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    if request.path == "/v1/chat/ws":
        return request.args.get("api_key") or None
    return None


def current_key() -> str | None:
    """The key this request's uids are bound to: the caller's, or None without ``API_KEYS``."""
    return presented_key() if current_app.config.get("CHATQUEUE_API_KEYS") else None


def may_read(uid: str) -> bool:
    """Whether the caller may read the answer of ``uid`` (always, without ``API_KEYS``)."""
    if not current_app.config.get("CHATQUEUE_API_KEYS"):
        return True
    key = presented_key()
    return key is not None and owned_by(uid, key)


def init_auth(app: Flask, api_keys: frozenset[str], public: frozenset[str] = frozenset()) -> None:
    """Refuse, before any route runs, a request without a valid key (but on
    ``PUBLIC_ENDPOINTS`` and ``public``)."""
    app.config["CHATQUEUE_API_KEYS"] = bool(api_keys)
    if not api_keys:
        return
    public = PUBLIC_ENDPOINTS | public
    digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in api_keys]

    @app.before_request
    def require_key() -> None:
        if request.endpoint in public:
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
