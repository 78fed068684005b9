"""scripts/bootstrap.py, run for real on copies of the checkout: what it tells a
user who is not root, and what a second run skips."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import RABBITMQ_URL, ROOT, free_port

# The machine's own Python, which a user other than root can run (the tests' may be
# under root's home), and which has no package of chatqueue's: the bootstrap runs
# before the venv exists.
SYSTEM_PYTHON = Path("/usr/bin/python3")

PROBE_PROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "cq-bootstrap-probe"
version = "{version}"

[project.optional-dependencies]
dev = []

[tool.setuptools]
packages = []
"""

Checkout = Callable[[str], Path]


@pytest.fixture
def checkout() -> Iterator[Checkout]:
    """A copy of the bootstrap and of config/ (which it reads RABBITMQ_URL with) beside
    a pyproject.toml of the test's, in a directory every user may enter."""
    made: list[Path] = []

    def make(pyproject: str) -> Path:
        root = Path(tempfile.mkdtemp(prefix="cq-bootstrap-"))
        made.append(root)
        root.chmod(0o755)
        shutil.copytree(
            ROOT / "config", root / "config", ignore=shutil.ignore_patterns("__pycache__")
        )
        (root / "scripts").mkdir()
        shutil.copy(ROOT / "scripts" / "bootstrap.py", root / "scripts")
        (root / "pyproject.toml").write_text(pyproject)
        return root

    yield make
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


def bootstrap(
    root: Path,
    env: dict[str, str],
    python: Path | str = sys.executable,
    user: pwd.struct_passwd | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the checkout's bootstrap, as ``user`` (uid, gid, no other group) if given."""
    return subprocess.run(
        [str(python), str(root / "scripts" / "bootstrap.py")],
        cwd=root,
        env=env,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_a_user_who_is_not_root_is_given_the_one_command(checkout: Checkout) -> None:
    if os.geteuid() != 0 or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root (to run the bootstrap as nobody) and /usr/bin/python3")
    root = checkout(PROBE_PROJECT.format(version="1"))
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/"

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root), "RABBITMQ_URL": closed}
    done = bootstrap(root, env, SYSTEM_PYTHON, user=pwd.getpwnam("nobody"))

    assert done.returncode == 1, done.stdout + done.stderr
    commands = [line.strip() for line in done.stderr.splitlines() if "sudo " in line]
    assert len(commands) == 1, done.stderr
    # The limit first, then the start: through the init script or systemd, which keep it.
    assert commands[0].startswith("sudo sh -c 'ulimit -n 65536; "), commands
    assert commands[0].endswith("service rabbitmq-server start'"), commands
    # It stops before the checkout's own part: nothing was made with half a machine.
    assert not (root / ".venv").exists()


@pytest.mark.slow  # over 8 s
def test_a_second_run_skips_what_is_done_and_a_changed_pyproject_is_installed(
    checkout: Checkout,
) -> None:
    root = checkout(PROBE_PROJECT.format(version="1"))
    env = {**os.environ, "RABBITMQ_URL": RABBITMQ_URL}
    env.pop("VIRTUAL_ENV", None)

    first = bootstrap(root, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "making the venv" in first.stdout
    assert "pip install -e '.[dev]'" in first.stdout

    started = time.monotonic()
    second = bootstrap(root, env)
    took = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout == ""
    assert took < 5, f"a second run took {took:.1f} s"

    (root / "pyproject.toml").write_text(PROBE_PROJECT.format(version="2"))
    third = bootstrap(root, env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "making the venv" not in third.stdout
    assert "pip install -e '.[dev]'" in third.stdout
    installed = subprocess.run(
        [
            root / ".venv" / "bin" / "python",
            "-c",
            "from importlib.metadata import version;print(version('cq-bootstrap-probe'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert installed.stdout.strip() == "2"
