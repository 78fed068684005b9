"""Builds the Flask app of ``gunicorn web:app``."""

from __future__ import annotations

import logging

from flask import Flask

from app import logs
from config import Settings, load_settings
from web import health, openai_compat, playground, sse, submit
from web.auth import init_auth
from web.errors import register_error_handlers
from web.metrics import init_metrics, public_endpoints
from web.services import EXTENSION, Services
from web.ws import init_ws


def create_app(settings: Settings | None = None) -> Flask:
    """The web front. Connects to nothing: connections open on first use."""
    settings = settings or load_settings()
    logging.basicConfig(
        level=logging.getLevelName(settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logs.install()  # kombu's consumers (accepted, metrics) lose a connection in one line

    app = Flask(__name__)
    # One byte more than allowed: werkzeug stops a body without a length at
    # this limit silently, so a body longer than the limit is read one byte
    # too long and refused by decode_body (413), never cut to a valid size.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = Services(settings)
    register_error_handlers(app)
    init_auth(app, settings.api_keys, public_endpoints(settings))
    for blueprint in (health.bp, submit.bp, sse.bp, openai_compat.bp, playground.bp):
        app.register_blueprint(blueprint)
    init_ws(app)
    init_metrics(app, settings)
    return app
