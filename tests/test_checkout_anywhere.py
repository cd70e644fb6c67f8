"""The suite passes wherever the project is cloned: here, under a 0700 home directory.

A new user clones into their home (mode 0700 under /root) and runs the tests; QEMU runs
as nobody, who cannot reach into that directory. Everything QEMU (or its probe) must read
belongs in a temporary directory it can reach: this runs the tests that launch QEMU as
nobody from such a clone, for real.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, is_root

# The tests that exec a QEMU stand-in as nobody, probe QEMU as nobody, or read images.
SUBSET = ["tests/test_launch.py", "tests/test_plan.py", "tests/test_golden.py", "tests/test_opener.py"]


@pytest.mark.skipif(not is_root(), reason="running QEMU as nobody needs root")
def test_launch_tests_pass_from_a_clone_under_a_0700_home(tmp_path: pathlib.Path) -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    home = tmp_path / "home"
    clone = home / "vmrun"
    for name in listed.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    home.chmod(0o700)
    env = {**os.environ, "PYTHONPATH": str(clone)}
    where = subprocess.run(
        [sys.executable, "-c", "import vmrun; print(vmrun.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(clone / "vmrun" / "__init__.py"), where
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not demo", *SUBSET],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
