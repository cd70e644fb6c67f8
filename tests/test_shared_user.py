"""`vmrun check` warns when another running VM's QEMU runs as the same user: processes of
one user can read each other's environment and take each other's fds."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import tomli_w

from tests.conftest import REPO, is_root
from tests.test_lifecycle import Running

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(not is_root(), reason="running QEMU as nobody needs root")]


def write(directory: pathlib.Path, name: str, user: str) -> pathlib.Path:
    path = directory / f"{name}.toml"
    vm = {"name": name, "memory": "64M", "accel": "tcg", "console": "none", "memlock": "off", "user": user}
    path.write_text(tomli_w.dumps({"vm": vm}))
    return path


def check(cfg: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", "check", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_check_warns_about_a_running_vm_of_the_same_user(tmp_path: pathlib.Path) -> None:
    first = Running(write(tmp_path, "first", "nobody"), "first", "--paused")
    try:
        first.wait_running()
        same = check(write(tmp_path, "second", "nobody"))
        assert same.returncode == 0, same.stdout + same.stderr
        assert f"first (pid {first.pid}) also runs as nobody" in same.stdout
        assert "give each VM a user of its own (useradd --system --no-create-home vm-second)" in same.stdout
        other = check(write(tmp_path, "third", "daemon"))
        assert "also runs as" not in other.stdout
        assert "no other running VM runs as daemon" in other.stdout
    finally:
        first.end()
