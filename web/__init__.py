"""The web front's entry point: ``gunicorn web:app`` finds :data:`app` here.

Run it with the project's gunicorn settings (``./gunicorn.conf.py``: gevent
workers, ``0.0.0.0:$PORT``); the routes are in docs/web.md.
"""

from __future__ import annotations

from web.factory import create_app

app = create_app()

__all__ = ["app", "create_app"]
