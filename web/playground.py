"""``GET /``: the playground, a chat page of plain HTML and a little JavaScript.

The page and its static files hold no data, so they are served without an API
key; the page asks for one and sends it with every call.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"

bp = Blueprint("playground", __name__)


@bp.get("/")
def index() -> Response:
    response = send_from_directory(STATIC, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
