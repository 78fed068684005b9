#!/usr/bin/env python3
"""Make this checkout ready to run and to test: scripts/run and scripts/test call it first.

usage: python3 scripts/bootstrap.py   (from any directory; it sets up the checkout it is in)

1. The machine, root's part: Python's ``venv`` module (Debian and Ubuntu ship
   it apart, as ``python3-venv``) and a RabbitMQ that answers at
   ``RABBITMQ_URL``. As root, what is missing is installed with apt-get and
   the broker started, with a raised open-file limit. Not root (or no
   apt-get), nothing is touched: the one command that would do it is printed,
   and the exit status is 1.
2. The checkout's venv, ``.venv``: made when missing or broken, and
   ``pip install -e '.[dev]'`` run when pyproject.toml changed since the last
   install (the hash of the one installed is kept in ``.venv``).

Each step is skipped when it is done already, so a second run prints nothing
and takes well under a second. A broker is installed or started only for a
``RABBITMQ_URL`` on this machine (localhost, 127.0.0.0/8, ::1): for another
host the bootstrap says that nothing answers there and stops.

This file runs before the venv exists, so it uses the standard library only;
so does ``config/``, through which it reads ``RABBITMQ_URL`` like every
process of chatqueue.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
# The sha256 of the pyproject.toml last installed into the venv.
STAMP = VENV / "chatqueue-installed"
PYTHON_NEEDED = (3, 11)
# RabbitMQ opens one file per durable queue it recovers at start; a node with
# 10,000 of them hung for 20 minutes at the 1,024 of a default shell.
NOFILE = 65536
# The distribution's own start: through systemd where it runs the machine (the unit
# sets the limit), else the init script, whose start-stop-daemon keeps the limit of
# the shell that calls it (`rabbitmq-server -detached` as root does not: Debian's
# wrapper switches to the rabbitmq user with su, whose PAM session sets 1,024 again).
# It waits until the node has booted, and a node already running is no error.
START_BROKER = "service rabbitmq-server start"
BROKER_START_TIMEOUT = 120.0
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


class SetupError(Exception):
    """What stops the set-up, said with what to do about it."""


def say(message: str) -> None:
    print(f"bootstrap: {message}", flush=True)


def check_python() -> None:
    if sys.version_info < PYTHON_NEEDED:
        raise SetupError(
            f"chatqueue needs Python {'.'.join(map(str, PYTHON_NEEDED))} or newer; "
            f"{sys.executable} is {sys.version.split()[0]}: put a newer python3 first on the PATH"
        )


def broker_url() -> str:
    sys.path.insert(0, str(ROOT))
    from config import ConfigError, load_settings

    try:
        return load_settings().rabbitmq_url
    except ConfigError as error:
        raise SetupError(str(error)) from None


def broker_addresses(url: str) -> list[tuple[str, int]]:
    """(host, port) of each broker in ``url``, a failover list being ``url;url;...``."""
    addresses = []
    for one in url.split(";"):
        parts = urlsplit(one.strip())
        addresses.append(
            (parts.hostname or "localhost", parts.port or DEFAULT_PORTS.get(parts.scheme, 5672))
        )
    return addresses


def answers(addresses: list[tuple[str, int]]) -> bool:
    """Whether any of the brokers accepts a TCP connection."""
    for host, port in addresses:
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            continue
        return True
    return False


def on_this_machine(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class MachineNeeds:
    """What this machine lacks that only root can give it."""

    url: str
    packages: list[str] = field(default_factory=list)
    start_broker: bool = False

    def __bool__(self) -> bool:
        return bool(self.packages or self.start_broker)

    def describe(self) -> str:
        said = [f"{package} is not installed" for package in self.packages]
        if self.start_broker:
            said.append(f"no RabbitMQ answers at {self.url}")
        return "; ".join(said)

    def script(self, nofile: int) -> str:
        """The shell script, for root, that gives the machine what it lacks."""
        steps = []
        if self.packages:
            steps += ["apt-get update", f"apt-get install -y {' '.join(self.packages)}"]
        if not self.start_broker:
            return " && ".join(steps)
        return f"ulimit -n {nofile}; " + " && ".join([*steps, START_BROKER])


def machine_needs(url: str) -> MachineNeeds:
    needs = MachineNeeds(url)
    if importlib.util.find_spec("ensurepip") is None:
        needs.packages.append("python3-venv")
    addresses = broker_addresses(url)
    needs.start_broker = not answers(addresses)
    if needs.start_broker and not all(on_this_machine(host) for host, _ in addresses):
        raise SetupError(
            f"nothing answers at RABBITMQ_URL={url}: start that broker, or unset "
            "RABBITMQ_URL to use a RabbitMQ on this machine (installed and started here)"
        )
    if needs.start_broker and shutil.which("rabbitmq-server") is None:
        needs.packages.append("rabbitmq-server")
    if needs.packages and shutil.which("apt-get") is None:
        raise SetupError(
            f"{needs.describe()}, and this machine has no apt-get: install "
            f"{' and '.join(needs.packages)} with its package manager (and start "
            "RabbitMQ), then run this again"
        )
    return needs


def set_up_machine(url: str) -> None:
    needs = machine_needs(url)
    if not needs:
        return
    if os.geteuid() != 0:
        raise SetupError(
            f"{needs.describe()}. Only root can see to that; this one command does:\n\n"
            f"    sudo sh -c {shlex.quote(needs.script(NOFILE))}\n\n"
            "then run this again (run as root, it does all of it by itself)"
        )
    # Root may not raise its hard limit in a container: ask for no more than it.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    script = needs.script(NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard))
    say(f"{needs.describe()}: {script}")
    # The outcome is checked below, whatever the script's exit status says.
    subprocess.run(
        ["sh", "-c", script], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False
    )
    importlib.invalidate_caches()  # the finders cache directory listings
    if importlib.util.find_spec("ensurepip") is None:
        raise SetupError("python3-venv did not install: see apt-get's output above")
    if needs.start_broker:
        wait_for_broker(url)


def wait_for_broker(url: str) -> None:
    addresses = broker_addresses(url)
    deadline = time.monotonic() + BROKER_START_TIMEOUT
    while not answers(addresses):
        if time.monotonic() > deadline:
            raise SetupError(
                f"RabbitMQ was started but nothing answers at {url} after "
                f"{BROKER_START_TIMEOUT:.0f} s: see its logs in /var/log/rabbitmq (a node "
                "listens on 5672 unless its rabbitmq.conf says otherwise)"
            )
        time.sleep(1)
    say(f"RabbitMQ answers at {url}")


def venv_works() -> bool:
    """Whether .venv has a Python that runs and a pip (a venv made without
    ensurepip has none)."""
    try:
        done = subprocess.run([VENV_PYTHON, "-c", "import pip"], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def set_up_venv() -> None:
    if not venv_works():
        say(f"making the venv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return
    say("installing chatqueue and its development tools: pip install -e '.[dev]'")
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", ".[dev]"], cwd=ROOT, check=True)
    STAMP.write_text(digest + "\n")


def main() -> int:
    try:
        check_python()
        set_up_machine(broker_url())
        set_up_venv()
    except SetupError as error:
        print(f"bootstrap: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"bootstrap: {shlex.join(map(str, error.cmd))} failed", file=sys.stderr)
        return error.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
