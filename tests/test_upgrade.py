"""`vmrun upgrade` on real QEMU (TCG; the nested bed proves it with VFIO devices).

The demo guest in count mode prints its boot id, a counter it keeps in RAM and the checksum
of 4 MiB of random bytes in its RAM, five times a second, on the serial console: vmrun run's
stdout, which the new QEMU inherits. An upgrade must leave all three going on as they were:
same boot, same bytes, the counter never starting over. Every failure must leave the old
QEMU running the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import REPO, is_root
from tests.test_vm_devices import demo, write

pytestmark = [pytest.mark.qemu, pytest.mark.skipif(not is_root(), reason="needs root to run QEMU as nobody")]
COUNT_RE = re.compile(r"vmrun-demo: count (\d+) boot (\S+) ram (\S+)")
QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
# bash: the command line without its last hot-plug root port, when it is the new QEMU's.
DROP_A_PORT = """if [[ " $* " = *" -incoming "* ]]; then
    args=(); for a; do [[ $a = *id=hotplug3,* ]] && unset 'args[-1]' || args+=("$a"); done; set -- "${args[@]}"
fi"""


def vmrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


class Guest:
    """A VM launched by `vmrun run`, its console lines collected as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def counts(self) -> list[tuple[int, str, str]]:
        return [(int(m[1]), m[2], m[3]) for line in list(self.lines) if (m := COUNT_RE.search(line))]

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            assert time.monotonic() < deadline, f"no {what} within {timeout:g} s:\n" + "\n".join(self.lines[-20:])
            time.sleep(0.05)

    def count_reaches(self, n: int) -> None:
        self.wait(f"count {n}", lambda: bool(self.counts()) and self.counts()[-1][0] >= n)

    def one_guest_throughout(self) -> None:
        """One boot, the same RAM, a counter that only ever went up by one."""
        counts = self.counts()
        assert len({(boot, ram) for _, boot, ram in counts}) == 1, counts
        numbers = [n for n, _, _ in counts]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers


def gone(pid: int) -> bool:
    """Exited: no process, or a zombie its parent (init, once vmrun upgrade is gone) has not reaped."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def pid_of(name: str) -> int:
    status = json.loads(vmrun("status", name, "--json").stdout)
    assert status["state"] == "running", status
    return int(status["pid"])


@pytest.fixture
def guest_files() -> Iterator[dict[str, str]]:
    """The demo guest where nobody may read it (a clone under /root is 0700)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-demo-"))
    d.chmod(0o755)
    files = {}
    for name, key in (("vmlinuz", "kernel"), ("initrd", "initrd")):
        shutil.copy(demo({})[key], d / name)
        (d / name).chmod(0o644)
        files[key] = str(d / name)
    yield files
    shutil.rmtree(d)


@contextlib.contextmanager
def counting_guest(tmp_path: pathlib.Path, files: dict[str, str], **vm: object) -> Iterator[Guest]:
    append = "console=ttyS0 quiet panic=-1 vmrun-demo=count"
    settings = {"name": "upg", "user": "nobody", "console": "stdio", "memory": "256M", **files, **vm}
    cfg = write(tmp_path, demo(settings))
    text = cfg.read_text().replace('append = "console=ttyS0 quiet panic=-1"', f'append = "{append}"')
    cfg.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmrun.cli", "run", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    guest = Guest(proc)
    try:
        guest.count_reaches(3)
        yield guest
    finally:
        vmrun("stop", "upg", "--timeout", "5")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(autouse=True)
def reachable_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """A state base QEMU's user can traverse, as /run/vmrun is: both QEMUs reach the hand-over
    sockets by path (pytest's own tree is 0700)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-state-"))
    d.chmod(0o755)
    monkeypatch.setenv("VMRUN_STATE_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def bin_dir() -> Iterator[pathlib.Path]:
    # Outside pytest's 0700 tree: nobody runs what is in it.
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-qemu-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def wrapper(bin_dir: pathlib.Path, name: str, body: str = "") -> pathlib.Path:
    """A QEMU binary that is QEMU but for what `body` (bash) does first. QEMU keeps the
    wrapper's name as argv[0], which is how vmrun knows it for the VM's QEMU. (A copy of
    the binary would not do: QEMU finds its firmware relative to where it is.)"""
    path = bin_dir / name
    path.write_text(f'#!/bin/bash\n{body}\nexec -a "$0" {QEMU} "$@"\n')
    path.chmod(0o755)
    return path


def test_upgrade_moves_the_running_guest_to_a_new_qemu(
    tmp_path: pathlib.Path, bin_dir: pathlib.Path, guest_files: dict[str, str]
) -> None:
    with counting_guest(tmp_path, guest_files) as guest:
        first = pid_of("upg")
        other = wrapper(bin_dir, "qemu-system-x86_64")  # another binary, as a package update puts in place
        done = vmrun("upgrade", "upg", "--qemu", str(other))
        assert done.returncode == 0, done.stderr + "\n".join(guest.lines[-10:])
        assert re.search(r"upgraded VM upg: QEMU \S+ \(pid \d+\) -> \S+ \(pid \d+\) in [0-9.]+ s", done.stdout)
        second = pid_of("upg")
        assert second != first
        assert guest.proc.wait(timeout=30) == 0  # `vmrun run` was the old QEMU: it quit
        assert pathlib.Path(f"/proc/{second}/cmdline").read_bytes().split(b"\0")[0] == os.fsencode(other)
        # The same user and sandbox, no way back to privilege.
        status = pathlib.Path(f"/proc/{second}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert re.search(r"^Seccomp:\s+2$", status, re.M) and re.search(r"^CapEff:\s+0+$", status, re.M)
        before = guest.counts()[-1][0]
        guest.count_reaches(before + 10)

        # Again, with the binary it now runs: a restart of QEMU under the guest.
        again = vmrun("upgrade", "upg")
        assert again.returncode == 0, again.stderr
        third = pid_of("upg")
        assert third not in (first, second) and gone(second)
        guest.count_reaches(guest.counts()[-1][0] + 10)
        guest.one_guest_throughout()
        stopped = vmrun("stop", "upg", "--timeout", "5")
        assert stopped.returncode == 0, stopped.stderr
        assert gone(third)


def test_upgrade_to_the_newer_qemu_build(
    tmp_path: pathlib.Path, guest_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From bookworm-backports' QEMU to the 10.2 build of the bed's newer stack
    (scripts/build-qemu; CI has built it for the bed by the time this runs): a real change
    of QEMU version under the running guest; the way back is refused."""
    from tests.e2e import bed

    monkeypatch.delenv("XDG_CACHE_HOME")  # the build's cache is the user's own, as the bed found it
    newer = str(bed.cpr_qemu_path())
    with counting_guest(tmp_path, guest_files) as guest:
        up = vmrun("upgrade", "upg", "--qemu", newer)
        assert up.returncode == 0, up.stderr + "\n".join(guest.lines[-10:])
        assert re.search(r"QEMU 10\.0\.\d+ \(pid \d+\) -> 10\.2\.\d+ \(pid \d+\)", up.stdout), up.stdout
        guest.count_reaches(guest.counts()[-1][0] + 10)
        # Back to 10.0 cannot be: the CPR channel's handshake changed in 10.1 (measured: the
        # 10.2 QEMU connects the main channel before a 10.0 one listens). Refused up front.
        down = vmrun("upgrade", "upg", "--qemu", QEMU)
        assert down.returncode == 1 and "handshake changed in 10.1" in down.stderr, down.stderr
        again = vmrun("upgrade", "upg")  # a restart of the 10.2 build under the guest
        assert again.returncode == 0, again.stderr
        guest.count_reaches(guest.counts()[-1][0] + 10)
        guest.one_guest_throughout()


@pytest.mark.parametrize(
    ("case", "body", "message"),
    [
        # The new QEMU dies before it takes anything over.
        (
            "broken",
            'for a; do [ "$a" = -incoming ] && { echo "broken QEMU" >&2; exit 1; }; done',
            "the new QEMU exited",
        ),
        # It starts without a device the running VM has: the hand-over itself fails, after
        # the old QEMU stopped the guest, which must run on.
        ("mismatch", DROP_A_PORT, "migration"),
    ],
    ids=["exits-at-start", "fails-mid-hand-over"],
)
def test_a_failed_upgrade_leaves_the_guest_on_the_old_qemu(
    case: str, body: str, message: str, tmp_path: pathlib.Path, bin_dir: pathlib.Path, guest_files: dict[str, str]
) -> None:
    bad = wrapper(bin_dir, case, body)
    with counting_guest(tmp_path, guest_files) as guest:
        first = pid_of("upg")
        failed = vmrun("upgrade", "upg", "--qemu", str(bad), "--timeout", "30")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
        assert pid_of("upg") == first and guest.proc.poll() is None
        status = json.loads(vmrun("qmp", "upg", "query-status").stdout)
        assert status["status"] == "running", status
        guest.count_reaches(guest.counts()[-1][0] + 10)
        guest.one_guest_throughout()
        # Nothing left behind: the next upgrade works.
        assert vmrun("upgrade", "upg").returncode == 0
        guest.count_reaches(guest.counts()[-1][0] + 5)
        guest.one_guest_throughout()


def test_what_cannot_be_upgraded_is_refused_before_anything_is_touched(
    tmp_path: pathlib.Path, bin_dir: pathlib.Path, guest_files: dict[str, str]
) -> None:
    # A QEMU without CPR transfer: as QEMU 9 would probe (no aux-ram-share machine property).
    old = wrapper(
        bin_dir, "no-cpr", f'[ "$*" = "-machine none,help" ] && {{ {QEMU} "$@" | grep -v aux-ram-share; exit 0; }}'
    )
    with counting_guest(tmp_path, guest_files, shared_ram=False) as guest:
        first = pid_of("upg")
        refused = vmrun("upgrade", "upg")
        assert refused.returncode == 1
        assert "its guest RAM is not shared memory" in refused.stderr and "shared_ram = true" in refused.stderr
        assert pid_of("upg") == first
        guest.count_reaches(guest.counts()[-1][0] + 3)
    with counting_guest(tmp_path, guest_files) as guest:
        first = pid_of("upg")
        refused = vmrun("upgrade", "upg", "--qemu", str(old))
        assert refused.returncode == 1
        assert "the new QEMU (" in refused.stderr and "has no CPR transfer" in refused.stderr, refused.stderr
        assert pid_of("upg") == first
        mode = json.loads(vmrun("qmp", "upg", "query-migrate-parameters").stdout)["mode"]
        assert mode == "normal"
        guest.count_reaches(guest.counts()[-1][0] + 3)
        guest.one_guest_throughout()
