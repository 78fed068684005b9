"""``python -m devllm``: run the development LLM (see :mod:`devllm.server`)."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

from devllm.cli import main  # noqa: E402 -- after patching, as gevent requires

if __name__ == "__main__":
    raise SystemExit(main())
