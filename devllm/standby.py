"""``--standby URL``: be the LLM at URL only when no real one answers there.

The Procfile starts ``python -m devllm --standby $OPENAI_URL``. If anything
answers HTTP at ``URL/models`` (any status), a real LLM is there and the
development LLM stays idle; if nothing does and URL is on this machine, it
binds URL's host and port and serves there. It never exits on its own (Procfile
runners stop every process when one exits), only on SIGTERM or SIGINT.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import logging
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from devllm.server import BANNER, serve, wait_for_stop_signal
from devllm.settings import Settings

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.5


def probe(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether anything answers HTTP at ``url + "/models"``, whatever the status."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url.rstrip("/") + "/models", timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        exc.close()
        return True
    except (OSError, http.client.HTTPException, ValueError):
        return False


def _is_localhost_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if _is_localhost_name(host):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_standby(url: str, settings: Settings) -> None:
    """Serve at ``url`` if no LLM answers there and it is local; otherwise idle until stopped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if probe(url):
        logger.info("an LLM answers at %s; the development LLM stays idle", url)
        wait_for_stop_signal()
        return
    if parts.scheme != "http" or not is_loopback(host):
        logger.warning(
            "no LLM answered at %s, and it is not a plain http:// address on this machine, so"
            " the development LLM cannot stand in: it stays idle. Start the LLM there, or point"
            " OPENAI_URL at http://localhost:11434/v1 to use the development LLM.",
            url,
        )
        wait_for_stop_signal()
        return
    if parts.path.rstrip("/") != "/v1":
        logger.warning("%s does not end in /v1: the development LLM serves under /v1 only", url)
    bind = "127.0.0.1" if _is_localhost_name(host) else host
    logger.info("no LLM answered at %s: serving %s there", url, BANNER)
    try:
        serve(dataclasses.replace(settings, host=bind, port=parts.port or 80))
    except OSError as exc:
        logger.error(
            "cannot listen on %s:%s (%s): the development LLM stays idle;"
            " free the port or point OPENAI_URL at a running LLM",
            bind,
            parts.port or 80,
            exc,
        )
        wait_for_stop_signal()
