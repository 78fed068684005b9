"""Private RabbitMQ nodes for tests and benchmarks: a node of its own, or a cluster.

A :class:`RabbitNode` runs the machine's own ``rabbitmq-server`` package as a
second (third, ...) node beside the shared one, so broker restarts, ``kill -9``
and resource alarms never disturb the shared broker or another run::

    with RabbitNode("restart") as node:
        url = node.url                 # amqp://guest:guest@localhost:<port>/
        node.restart_app()             # stop_app + start_app: a broker restart
        node.set_memory_alarm()        # publishers get blocked
        node.clear_memory_alarm()

Each node has, under one directory (a temporary one unless given):

- its own name (``RABBITMQ_NODENAME``, ``cq-<purpose>-<pid>-<n>@localhost``),
  its own AMQP port and its own distribution port (``RABBITMQ_DIST_PORT``),
  both found free on 127.0.0.1, so it never meets the shared node's 5672/25672;
- its own ``rabbitmq.conf`` (``RABBITMQ_CONFIG_FILE``) with its own listener:
  ``/etc/rabbitmq/rabbitmq.conf`` may pin ``listeners.tcp.local = ...:5672``,
  which wins over ``RABBITMQ_NODE_PORT``; its own ``rabbitmq-env.conf``
  (``RABBITMQ_CONF_ENV_FILE``), so ``/etc/rabbitmq/rabbitmq-env.conf`` and its
  ``NODENAME`` are not read either; no plugins (management off);
- its own data, log and pid file, and its own Erlang cookie in ``home/``, the
  ``HOME`` of the server and of the ``rabbitmqctl`` calls made here;
- an open-file limit of ``nofile`` (65,536 by default, or the hard limit when
  that is lower): a node recovering thousands of durable queues wants one file
  per queue, and hung for 20 minutes at the Debian service's 1,024.

Run as root, the node runs as the ``rabbitmq`` user (its directory is chowned
to it), as the Debian ``/usr/sbin/rabbitmq-server`` wrapper would; otherwise
as the current user. ``rabbitmqctl`` is called from
``/usr/lib/rabbitmq/bin`` directly: the ``/usr/sbin`` wrapper switches to the
``rabbitmq`` user and its ``HOME``, whose cookie is the shared node's.

A node started here gets SIGTERM (a clean stop) if this process dies; one
started with ``detached=True`` outlives it (the cluster script's nodes).
:class:`RabbitCluster` joins several nodes with ``rabbitmqctl join_cluster``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil

from chatqueue_testing.harness import free_port

DEFAULT_NOFILE = 65536
SERVER_USER = "rabbitmq"
SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/sbin", "/usr/local/sbin")
NODE_FILE = "node.json"
# The default vm_memory_high_watermark: what clear_memory_alarm() restores.
MEMORY_WATERMARK = 0.4
DISK_FREE_LIMIT = "50MB"

_counter = 0
_counter_lock = threading.Lock()


class RabbitNodeError(RuntimeError):
    """A private node did not start, stop or answer; the message carries its log."""


# --- where the package is ----------------------------------------------------------------------


def scripts_dir() -> Path | None:
    """The directory of the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that ``su``s to the
    ``rabbitmq`` user and resets ``HOME``; the scripts it calls live in
    ``/usr/lib/rabbitmq/bin``. Elsewhere (a generic unix install) the first
    ``rabbitmq-server`` on ``PATH`` is used.
    """
    for d in SCRIPT_DIRS:
        if (Path(d) / "rabbitmq-server").is_file() and (Path(d) / "rabbitmqctl").is_file():
            return Path(d)
    found = shutil.which("rabbitmq-server")
    if found:
        real = Path(found).resolve().parent
        if (real / "rabbitmqctl").is_file():
            return real
    return None


def available() -> bool:
    """Whether ``rabbitmq-server`` is installed here (tests skip when it is not)."""
    return scripts_dir() is not None


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
CONNECTION_START = b"\x00\x0a\x00\x0a"  # class 10 (connection), method 10 (start)


def amqp_answers(port: int, timeout: float = 1.0, host: str = "127.0.0.1") -> bool:
    """Whether an AMQP 0-9-1 broker answers on ``port``: it replies to the protocol
    header with ``connection.start``. RabbitMQ opens its listener at the end of its
    boot, when the guest user exists, so this is "started" (standard library only,
    so the cluster script runs with any python3)."""
    try:
        with socket.create_connection((host, port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(AMQP_HEADER)
            head = b""
            while len(head) < 11:
                chunk = s.recv(11 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    # frame type 1 (method), channel 0, 4 bytes of size, then class and method ids
    return head[0] == 1 and head[7:11] == CONNECTION_START


def _next_index() -> int:
    global _counter  # noqa: PLW0603
    with _counter_lock:
        _counter += 1
        return _counter


def _server_user() -> pwd.struct_passwd | None:
    """The user the node runs as: ``rabbitmq`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        return None


def _alive(pid: int) -> bool:
    try:
        # A zombie is gone for our purposes.
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


# --- one node ----------------------------------------------------------------------------------


@dataclass
class RabbitNode:
    """A private RabbitMQ node; see the module docstring.

    ``directory`` (created if missing) keeps the node's files; when it is not
    given a temporary one is made and :meth:`stop` removes it. ``remove`` says
    whether :meth:`stop` deletes the directory (by default only a temporary
    one). Ports default to free ones, found when the node is made.
    """

    purpose: str = "test"
    directory: Path | None = None
    nodename: str = ""
    port: int = 0
    dist_port: int = 0
    cookie: str = ""
    nofile: int = DEFAULT_NOFILE
    detached: bool = False
    remove: bool | None = None
    extra_config: Sequence[str] = ()
    start_timeout: float = 90.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _user: pwd.struct_passwd | None = field(default=None, init=False, repr=False)
    _scripts: Path = field(default=Path(), init=False, repr=False)
    _alarms: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        found = scripts_dir()
        if found is None:
            raise RabbitNodeError(
                "rabbitmq-server is not installed: apt-get install rabbitmq-server "
                "(or put its sbin directory on PATH)"
            )
        self._scripts = found
        self._user = _server_user()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=f"cq-rabbit-{self.purpose}-"))
            if self.remove is None:
                self.remove = True
        self.directory = Path(self.directory)
        if self.remove is None:
            self.remove = False
        if not self.nodename:
            self.nodename = f"cq-{self.purpose}-{os.getpid()}-{_next_index()}@localhost"
        self.port = self.port or free_port()
        self.dist_port = self.dist_port or free_port()
        self.cookie = self.cookie or secrets.token_hex(16)

    # -- files ---------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        assert self.directory is not None
        return self.directory

    @property
    def home(self) -> Path:
        return self.dir / "home"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbitmq.pid"

    @property
    def config_file(self) -> Path:
        return self.dir / "rabbitmq.conf"

    @property
    def startup_log(self) -> Path:
        return self.log_dir / "startup.log"

    @property
    def url(self) -> str:
        """The AMQP URL of the node (guest may log in from localhost only)."""
        return f"amqp://guest:guest@localhost:{self.port}/"

    def _write_files(self) -> None:
        for d in (self.dir, self.home, self.log_dir, self.dir / "mnesia", self.dir / "conf.d"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        self.config_file.write_text(
            "\n".join(
                [
                    "# A private node of chatqueue_testing/rabbitnode.py, not the shared one.",
                    f"listeners.tcp.default = 127.0.0.1:{self.port}",
                    "loopback_users.guest = true",
                    "log.file.level = info",
                    "log.console = false",
                    *self.extra_config,
                    "",
                ]
            )
        )
        (self.dir / "rabbitmq-env.conf").write_text("# Empty: /etc/rabbitmq's is not read.\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / NODE_FILE).write_text(
            json.dumps(
                {
                    "purpose": self.purpose,
                    "nodename": self.nodename,
                    "port": self.port,
                    "dist_port": self.dist_port,
                    "cookie": self.cookie,
                    "nofile": self.nofile,
                },
                indent=2,
            )
        )
        if self._user is not None:
            uid, gid = self._user.pw_uid, self._user.pw_gid
            os.chown(self.dir, uid, gid)
            for root, dirs, files in os.walk(self.dir):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    @classmethod
    def load(cls, directory: Path, **overrides: object) -> RabbitNode:
        """The node whose files are in ``directory`` (started or not), e.g. from
        another process: the cluster script's ``kill`` and ``down``."""
        saved = json.loads((Path(directory) / NODE_FILE).read_text())
        saved.update(overrides)
        return cls(directory=Path(directory), remove=False, **saved)

    def environ(self) -> dict[str, str]:
        """The environment of this node's ``rabbitmq-server`` and ``rabbitmqctl``."""
        keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(self.config_file),
            RABBITMQ_CONFIG_FILES=str(self.dir / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_PID_FILE=str(self.pid_file),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    # -- processes -----------------------------------------------------------------------------

    @property
    def beam_pid(self) -> int | None:
        """The pid of the node's ``beam.smp``, when it runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _alive(pid):
            return None
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            return pid
        return pid if any("beam" in part for part in cmdline) else None

    def running(self) -> bool:
        return self.beam_pid is not None

    def open_files_limit(self) -> int | None:
        """The soft open-file limit of the running ``beam.smp`` (from /proc: psutil's
        ``rlimit`` calls prlimit(2), which this machine denies even to root)."""
        pid = self.beam_pid
        if pid is None:
            return None
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return None

    def _nofile(self) -> int:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY:
            return self.nofile
        return min(self.nofile, hard)

    def start(self, wait: bool = True) -> RabbitNode:
        """Start the node (again, after :meth:`kill` or :meth:`stop`) and wait until
        AMQP answers on its port."""
        if self.running():
            raise RabbitNodeError(f"{self.nodename} already runs (pid {self.beam_pid})")
        if port_in_use(self.port):
            raise RabbitNodeError(f"port {self.port} of {self.nodename} is taken")
        self._write_files()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        server = str(self._scripts / "rabbitmq-server")
        # The limit is raised in a shell, as the service would; `ulimit -n` sets the
        # soft and the hard limit, which may not go above the hard one we have.
        argv = ["/bin/sh", "-c", f'ulimit -n {self._nofile()} && exec "$0"', server]
        setpriv = shutil.which("setpriv")
        if not self.detached and setpriv:
            # SIGTERM (a clean stop) when this process dies; set after the switch to
            # the rabbitmq user below, so it sticks (a preexec_fn is unsafe in a
            # process with threads, as a test run is).
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        user = self._user
        with open(self.startup_log, "ab") as out:
            self._proc = subprocess.Popen(
                argv,
                env=self.environ(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        if not self.detached:
            atexit.register(self._at_exit)
        if wait:
            self.wait_amqp(self.start_timeout)
        return self

    def _at_exit(self) -> None:
        """A node left running when the interpreter ends is stopped with it."""
        if self._proc is not None:
            self.stop()

    def _server_exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None

    def wait_amqp(self, timeout: float = 60.0) -> None:
        """Wait until guest can log in over AMQP (the node's listener opens last)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._server_exited():
                raise RabbitNodeError(f"{self.nodename} exited while starting:\n{self.log_tail()}")
            if self.answers():
                return
            if time.monotonic() > deadline:
                raise RabbitNodeError(
                    f"{self.nodename} did not answer AMQP on port {self.port} within "
                    f"{timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether the node's AMQP listener answers now (see :func:`amqp_answers`)."""
        return amqp_answers(self.port, timeout)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in (self.startup_log, self.log_dir / f"{self.nodename}.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> args...`` and return its output."""
        argv = [str(self._scripts / "rabbitmqctl"), "-n", self.nodename, *args]
        done = subprocess.run(
            argv,
            env=self.environ(),
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} on {self.nodename} failed "
                f"({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: every client connection is closed, the VM stays."""
        self.ctl("stop_app")

    def start_app(self, timeout: float = 60.0) -> None:
        """``rabbitmqctl start_app``, then wait until AMQP answers."""
        self.ctl("start_app", timeout=timeout)
        self.wait_amqp(timeout)

    def restart_app(self) -> None:
        """A broker restart as a client sees it: stop_app then start_app."""
        self.stop_app()
        self.start_app()

    def kill(self) -> None:
        """``kill -9`` of the node's ``beam.smp``; :meth:`start` brings it back."""
        pid = self.beam_pid
        if pid is None:
            raise RabbitNodeError(f"{self.nodename} does not run")
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 30)
        self._reap(10)

    def _reap(self, timeout: float) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None
            with contextlib.suppress(Exception):
                atexit.unregister(self._at_exit)

    def halt(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (SIGTERM to ``beam.smp``), keep its files; SIGKILL
        after ``timeout`` seconds."""
        pid = self.beam_pid
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
        self._reap(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node and remove its directory (if temporary, or ``remove=True``)."""
        try:
            self.halt(timeout)
        finally:
            if self.remove:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- alarms --------------------------------------------------------------------------------

    def alarms(self) -> list[str]:
        """The resource alarms in effect on the node, e.g. ``["memory"]``."""
        out = self.ctl("eval", "rabbit_alarm:get_alarms().")
        return sorted(set(re.findall(r"resource_limit,\s*(\w+)", out)))

    def set_memory_alarm(self) -> None:
        """Raise the memory alarm: publishing connections are blocked."""
        self._alarms.add("memory")
        self.ctl("set_vm_memory_high_watermark", "0.0000001")
        self._wait_alarm("memory", True)

    def clear_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", str(MEMORY_WATERMARK))
        self._wait_alarm("memory", False)
        self._alarms.discard("memory")

    def set_disk_alarm(self) -> None:
        """Raise the disk alarm (a free-disk limit no disk meets)."""
        self._alarms.add("disk")
        self.ctl("set_disk_free_limit", "1000000GB")
        self._wait_alarm("disk", True)

    def clear_disk_alarm(self) -> None:
        self.ctl("set_disk_free_limit", DISK_FREE_LIMIT)
        self._wait_alarm("disk", False)
        self._alarms.discard("disk")

    def reset(self) -> None:
        """Undo what a test did to the node: start it if it was killed or stopped,
        start its app if it was stopped, clear the alarms raised through this object.
        Costs one AMQP connection when there is nothing to undo."""
        if not self.running():
            self.start()
        elif not self.answers():
            self.start_app()
        if "memory" in self._alarms:
            self.clear_memory_alarm()
        if "disk" in self._alarms:
            self.clear_disk_alarm()

    def _wait_alarm(self, kind: str, present: bool, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (kind in self.alarms()) != present:
            if time.monotonic() > deadline:
                state = "raised" if present else "cleared"
                raise RabbitNodeError(f"the {kind} alarm of {self.nodename} was not {state}")
            time.sleep(0.2)

    # -- context manager -----------------------------------------------------------------------

    def __enter__(self) -> RabbitNode:
        if not self.running():
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def rabbit_node(purpose: str = "test", **options: object) -> Iterator[RabbitNode]:
    """A started private node, stopped and removed on exit."""
    node = RabbitNode(purpose, **options)  # type: ignore[arg-type]
    with node:
        yield node


# --- a cluster ---------------------------------------------------------------------------------


@dataclass
class RabbitCluster:
    """``size`` private nodes on this machine, joined into one cluster.

    Node ``i`` (1-based) is ``cq-<name>-node<i>@localhost`` with AMQP port
    ``base_port + i - 1`` and distribution port ``dist_base_port + i - 1``
    (free ones when the bases are 0), its files in ``directory/node<i>``, and
    the cluster's one Erlang cookie.
    """

    directory: Path
    name: str = "cluster"
    size: int = 3
    base_port: int = 0
    dist_base_port: int = 0
    nofile: int = DEFAULT_NOFILE
    detached: bool = False
    extra_config: Sequence[str] = ()
    nodes: list[RabbitNode] = field(default_factory=list, init=False)

    STATE = "cluster.json"

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        state = self.directory / self.STATE
        if state.exists():
            saved = json.loads(state.read_text())
            self.nodes = [RabbitNode.load(self.directory / d) for d in saved["nodes"]]
            for node in self.nodes:
                node.detached = self.detached
            return
        cookie = secrets.token_hex(16)
        for i in range(1, self.size + 1):
            self.nodes.append(
                RabbitNode(
                    purpose=self.name,
                    directory=self.directory / f"node{i}",
                    nodename=f"cq-{self.name}-node{i}@localhost",
                    port=self.base_port + i - 1 if self.base_port else 0,
                    dist_port=self.dist_base_port + i - 1 if self.dist_base_port else 0,
                    cookie=cookie,
                    nofile=self.nofile,
                    detached=self.detached,
                    remove=False,
                    extra_config=self.extra_config,
                )
            )

    def exists(self) -> bool:
        return (self.directory / self.STATE).exists()

    def node(self, i: int) -> RabbitNode:
        """Node ``i``, counted from 1."""
        if not 1 <= i <= len(self.nodes):
            raise RabbitNodeError(f"no node {i}: the cluster has nodes 1 to {len(self.nodes)}")
        return self.nodes[i - 1]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def failover_url(self) -> str:
        """The nodes' URLs joined by ``;``, as kombu takes a failover list."""
        return ";".join(self.urls)

    def up(self) -> None:
        """Start every node (in parallel), then join nodes 2.. to node 1. Nodes that
        already run are left alone: ``up`` after a ``kill`` starts the killed one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        (self.directory / self.STATE).write_text(
            json.dumps({"nodes": [n.dir.name for n in self.nodes]}, indent=2)
        )
        for node in self.nodes:
            if not node.running() and port_in_use(node.port):
                raise RabbitNodeError(f"port {node.port} of {node.nodename} is taken")
        for node in self.nodes:
            if not node.running():
                node.start(wait=False)
        for node in self.nodes:
            node.wait_amqp(node.start_timeout)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            if first.nodename in self.running_nodes(node):
                continue
            node.ctl("stop_app")
            node.ctl("join_cluster", first.nodename)
            node.start_app()

    def running_nodes(self, via: RabbitNode | None = None) -> list[str]:
        """The running members of the cluster, as a node (by default the first that
        runs) sees them."""
        for node in [via] if via else self.nodes:
            if node is None or not node.running():
                continue
            out = node.ctl("eval", "rabbit_nodes:all_running().")
            return sorted(re.findall(r"'([^']+@[^']+)'", out))
        return []

    def status(self) -> list[dict[str, object]]:
        members = self.running_nodes()
        return [
            {
                "node": i,
                "name": node.nodename,
                "url": node.url,
                "beam_pid": node.beam_pid,
                "amqp": node.answers(),
                "in_cluster": node.nodename in members,
                "open_files": node.open_files_limit(),
            }
            for i, node in enumerate(self.nodes, 1)
        ]

    def kill(self, i: int) -> None:
        self.node(i).kill()

    def reset(self) -> None:
        """Start the nodes a test killed or stopped, and the apps it stopped."""
        for node in self.nodes:
            node.reset()

    def restart(self, i: int) -> None:
        """Stop node ``i`` cleanly if it runs (start it if it was killed), then start
        it; it rejoins the cluster by itself."""
        node = self.node(i)
        if node.running():
            node.halt()
        node.start()

    def down(self, remove: bool = True) -> None:
        """Stop every node (all at once); remove the directory."""
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda node: node.halt(), self.nodes))
        finally:
            if remove:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()
