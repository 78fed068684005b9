"""The worker's entry point: ``celery -A app worker`` finds :data:`app` here.

The Celery app is built on first access, so that importing a module of this
package (the web front does) builds nothing and reads no setting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.factory import ChatqueueCelery

    app: ChatqueueCelery


def __getattr__(name: str) -> Any:
    if name == "app":
        from app.factory import create_app

        globals()["app"] = built = create_app()
        return built
    raise AttributeError(f"module 'app' has no attribute {name!r}")
