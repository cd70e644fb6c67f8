"""`vmrun ps`, `status`, `qmp` and `stop` against real QEMU (TCG), started by `vmrun run`.

The guests are QEMU with no OS (the firmware idles and ignores the ACPI power button, so
`stop` must escalate), a QEMU frozen by SIGSTOP (QMP cannot answer, SIGTERM stays pending:
only SIGKILL ends it), and Debian's kernel with a busybox init that powers off when the
power button is pressed (`stop` ends at the first step). Also: the shell completion that
is checked in matches its generator, and the systemd unit is one systemd accepts.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tomli_w

from tests.conftest import REPO
from vmrun import cli
from vmrun.control import state
from vmrun.tools import completion

QEMU_MARK = pytest.mark.qemu


def vmrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def write_config(directory: pathlib.Path, name: str = "t", **vm: Any) -> pathlib.Path:
    path = directory / f"{name}.toml"
    settings = {"name": name, "memory": "64M", "accel": "tcg", "console": "none", "memlock": "off", **vm}
    path.write_text(tomli_w.dumps({"vm": settings}))
    return path


class Running:
    """A `vmrun run` in the background; its pid is QEMU's once vmrun has exec'ed."""

    def __init__(self, cfg: pathlib.Path, name: str, *extra: str) -> None:
        self.name = name
        self.out = cfg.with_suffix(".out")
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmrun.cli", "run", *extra, str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_running(self, timeout: float = 30) -> None:
        """Until the VM's QEMU answers QMP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vmrun run exited: {self.output()}"
            vm = state.load(self.name)
            if vm is not None and vm.running and vm.pid == self.pid and vm_answers(vm.qmp_socket):
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not come up: {self.output()}")

    def wait_output(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"QEMU exited: {self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} on the console: {self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def vm_answers(path: str) -> bool:
    from vmrun.control import qmp

    try:
        qmp.execute(path, "query-status")
    except qmp.QmpError:
        return False
    return True


@pytest.fixture
def launch(tmp_path: pathlib.Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(name: str = "t", *extra: str, wait: bool = True, **vm: Any) -> Running:
        r = Running(write_config(tmp_path, name, **vm), name, *extra)
        started.append(r)
        if wait:
            r.wait_running()
        return r

    yield start
    for r in started:
        r.end()


def gone(r: Running) -> None:
    """The VM is gone as `run` sees it: process exited, lock free, not listed."""
    r.proc.wait(timeout=10)
    vm = state.load(r.name)
    assert vm is not None and vm.state == "stopped"
    assert not state.lock_held(vm.lock_file)
    assert vmrun("ps", "--quiet").stdout == ""


@QEMU_MARK
def test_ps_status_and_qmp_of_a_paused_vm(launch: Callable[..., Running]) -> None:
    r = launch("alpha", "--paused")
    # The record identifies QEMU exactly: exec kept vmrun's pid and start time.
    vm_dir = pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / "alpha"
    record = json.loads((vm_dir / "state.json").read_text())
    lock = (vm_dir / "lock").stat()
    stat = pathlib.Path(f"/proc/{r.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert record["phase"] == "exec" and record["pid"] == r.pid and record["start_ticks"] == int(stat[19])
    assert record["exe"] == os.readlink(f"/proc/{r.pid}/exe") and record["lock"] == [lock.st_dev, lock.st_ino]
    assert record["launcher"] == os.path.realpath(sys.executable)
    assert (vm_dir / "pid").read_text() == f"{r.pid}\n"
    ps = vmrun("ps")
    assert ps.returncode == 0, ps.stderr
    header, row = ps.stdout.splitlines()
    assert header.split() == ["NAME", "PID", "USER", "UPTIME", "RSS", "DEVICES"]
    assert row.split()[:3] == ["alpha", str(r.pid), "root" if os.geteuid() == 0 else os.environ.get("USER", "?")]
    [entry] = json.loads(vmrun("ps", "--json").stdout)
    assert entry["pid"] == r.pid and entry["state"] == "running" and entry["rss_bytes"] > 1024 * 1024
    assert entry["config"].endswith("alpha.toml")

    status = json.loads(vmrun("status", "alpha", "--json").stdout)
    assert status["status"]["status"] == "prelaunch" and status["pid"] == r.pid
    assert json.loads(vmrun("qmp", "alpha", "cont").stdout) == {}
    assert json.loads(vmrun("qmp", "alpha", "query-status").stdout)["status"] == "running"
    assert vmrun("qmp", "alpha", "stop").returncode == 0
    text = vmrun("status", "alpha")
    assert text.returncode == 0 and re.search(r"^  state +paused$", text.stdout, re.M), text.stdout
    assert re.search(rf"^  pid +{r.pid}$", text.stdout, re.M)
    objects = json.loads(vmrun("qmp", "alpha", "qom-list", '{"path": "/objects"}').stdout)
    # Guest RAM is vmrun's shared memfd (vm.shared_ram, on where QEMU has CPR transfer).
    assert {"name": "guest-ram", "type": "child<memory-backend-memfd>"} in objects


@QEMU_MARK
def test_second_run_of_the_same_name_fails_clearly(launch: Callable[..., Running], tmp_path: pathlib.Path) -> None:
    r = launch("beta", "--paused")
    second = vmrun("run", str(tmp_path / "beta.toml"))
    assert second.returncode == 1
    assert second.stderr.startswith(f"vmrun: VM beta is already running (pid {r.pid})"), second.stderr
    assert "Traceback" not in second.stderr


@QEMU_MARK
def test_qmp_errors_are_clear(launch: Callable[..., Running]) -> None:
    launch("gamma", "--paused")
    cases = [
        (("qmp", "gamma", "no-such-command"), 1, "vmrun qmp: QMP no-such-command failed: The command no-such-command"),
        (("qmp", "gamma", "qom-list", '{"path": "/nowhere"}'), 1, "vmrun qmp: QMP qom-list failed: "),
        (("qmp", "gamma", "query-status", "[1]"), 2, "vmrun qmp: ARGS-JSON must be a JSON object"),
        (("qmp", "gamma", "query-status", "{nope"), 2, "vmrun qmp: ARGS-JSON is not JSON: "),
        (("qmp", "nobody-here", "query-status"), 1, "vmrun qmp: VM nobody-here is not running"),
        (("qmp", "../etc", "query-status"), 2, "vmrun qmp: '../etc' is not a VM name"),
        (("status", "nobody-here"), 1, "vmrun status: VM nobody-here is not running"),
        (("stop", "nobody-here"), 1, "vmrun stop: VM nobody-here is not running"),
        (("stop", "gamma", "--timeout", "0"), 2, "vmrun stop: error: argument --timeout: '0' is not a number"),
    ]
    for args, code, message in cases:
        proc = vmrun(*args)
        assert (proc.returncode, "Traceback" in proc.stderr) == (code, False), (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)


def own_record(vm_dir: pathlib.Path, lock: int, **changes: object) -> None:
    """A state.json that identifies this very process as the VM's QEMU, holding `lock`."""
    st = os.fstat(lock)
    cmdline = pathlib.Path("/proc/self/cmdline").read_bytes().split(b"\0")[:-1]
    stat = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    record = {
        "name": vm_dir.name,
        "pid": os.getpid(),
        "start_ticks": int(stat[19]),
        "exe": os.path.realpath("/proc/self/exe"),
        "argv": [a.decode() for a in cmdline],
        "lock": [st.st_dev, st.st_ino],
        "started": time.time(),
        **changes,
    }
    (vm_dir / "state.json").write_text(json.dumps(record))


def test_qmp_socket_that_refuses_is_reported(tmp_path: pathlib.Path) -> None:
    # A VM whose lock is held by its proven process, but nothing listens on its socket.
    vm_dir = pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / "delta"
    vm_dir.mkdir(parents=True, mode=0o700)
    lock = os.open(vm_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    own_record(vm_dir, lock)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(vm_dir / "qmp.sock"))
    dead.close()
    try:
        proc = vmrun("qmp", "delta", "query-status")
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"vmrun qmp: the QMP socket {vm_dir}/qmp.sock refused the connection")
        listed = vmrun("ps").stdout
        assert re.search(rf"^delta +{os.getpid()} ", listed, re.M), listed
    finally:
        os.close(lock)
    assert vmrun("ps", "--quiet").stdout == "" and "delta" in vmrun("ps", "--all").stdout


def test_lock_held_with_a_reused_pid_is_stale_and_not_signalled(tmp_path: pathlib.Path) -> None:
    vm_dir = pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / "epsilon"
    vm_dir.mkdir(parents=True, mode=0o700)
    lock = os.open(vm_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    # The recorded start time is not this process's: the pid was reused by a later process.
    own_record(vm_dir, lock, start_ticks=1)
    try:
        vm = state.load("epsilon")
        assert vm is not None and vm.state == "stale" and vm.process is None
        own_record(vm_dir, lock, start_ticks=1)
        proc = vmrun("stop", "epsilon")
        assert proc.returncode == 1
        assert proc.stderr.startswith(
            f"vmrun stop: VM epsilon is not running (stale state: pid {os.getpid()} is a later process than the one"
            " vmrun started); nothing was signalled"
        )
        assert not (vm_dir / "state.json").exists(), "the stale record is removed"
    finally:
        os.close(lock)


def test_stale_state_dirs_are_not_running(tmp_path: pathlib.Path) -> None:
    base = pathlib.Path(os.environ["VMRUN_STATE_DIR"])
    (base / "old").mkdir(parents=True)
    (base / "old" / "lock").write_text("")
    (base / "old" / "state.json").write_text(json.dumps({"pid": 1, "started": 0}))
    (base / "not-a-vm").mkdir()  # no lock: not made by vmrun run
    assert vmrun("ps").stdout.split() == ["NAME", "PID", "USER", "UPTIME", "RSS", "DEVICES"]
    assert [v["name"] for v in json.loads(vmrun("ps", "--all", "--json").stdout)] == ["old"]
    assert json.loads(vmrun("ps", "--json").stdout) == []


def stop(name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = vmrun("stop", name, *extra)
    return proc, time.monotonic() - start


@QEMU_MARK
def test_stop_escalates_to_quit_when_the_guest_ignores_the_power_button(launch: Callable[..., Running]) -> None:
    r = launch("zeta")  # running firmware, no OS: nobody handles the ACPI event
    proc, took = stop("zeta", "--timeout", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"stopping zeta (pid {r.pid}), timeout 3 s"
    assert lines[1] == "powerdown: ACPI power button pressed, waiting up to 2 s for the guest to shut down"
    assert lines[2] == "powerdown: still running after 2 s"
    assert lines[3].startswith("quit: QMP quit sent")
    assert re.fullmatch(r"zeta stopped after \d+\.\d s \(quit\)", lines[4]), lines
    gone(r)
    assert r.proc.returncode == 0  # quit is a clean exit
    print(f"vmrun stop, idle guest that ignores the power button, --timeout 3: {took:.2f} s (2 s of powerdown wait)")


@QEMU_MARK
def test_stop_of_a_paused_guest_goes_straight_to_quit(launch: Callable[..., Running]) -> None:
    r = launch("eta", "--paused")
    proc, took = stop("eta")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "powerdown: skipped, the guest is prelaunch and cannot see the power button" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("(quit)")
    gone(r)
    print(f"vmrun stop, paused guest (quit at once): {took:.2f} s including vmrun's start")


@QEMU_MARK
def test_stop_of_a_frozen_qemu_ends_with_sigkill(launch: Callable[..., Running]) -> None:
    r = launch("theta")
    os.kill(r.pid, signal.SIGSTOP)
    proc, took = stop("theta", "--timeout", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "powerdown: not sent: QEMU did not greet" in out
    assert "quit: not sent: QEMU did not greet" in out
    assert f"SIGTERM: sent to pid {r.pid}" in out and "SIGTERM: still running after 0.5 s" in out
    assert f"SIGKILL: sent to pid {r.pid}" in out and out.splitlines()[-1].endswith("(SIGKILL)")
    gone(r)
    assert r.proc.returncode == -signal.SIGKILL
    assert took < 3 + 5


def demo_guest() -> pathlib.Path:
    """The demo guest of scripts/install; it waits for the power button when asked to."""
    demo = REPO / "build" / "demo"
    if not (demo / "initrd").exists():
        pytest.fail("build/demo is missing: scripts/install builds the demo guest")
    return demo


@QEMU_MARK
def test_stop_of_a_guest_that_honours_the_power_button(launch: Callable[..., Running]) -> None:
    guest = demo_guest()
    r = launch(
        "iota",
        memory="128M",
        console="stdio",
        kernel=str(guest / "vmlinuz"),
        initrd=str(guest / "initrd"),
        append="console=ttyS0 quiet panic=-1 vmrun-demo=wait-power",
        args=["-no-reboot"],
    )
    r.wait_output("vmrun-demo: waiting for the power button on /dev/input/event")
    proc, took = stop("iota")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].endswith("(powerdown)"), proc.stdout
    assert "vmrun-demo: power button pressed" in r.output()
    gone(r)
    assert r.proc.returncode == 0
    print(f"vmrun stop, guest that shuts down on the power button: {took:.2f} s")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def until_qmp_answers(path: pathlib.Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "QEMU exited"
        if path.exists() and vm_answers(str(path)):
            return
        time.sleep(0.005)
    raise AssertionError("QMP did not answer")


@QEMU_MARK
def test_launch_time_vmrun_run_vs_qemu_directly(tmp_path: pathlib.Path) -> None:
    cfg = write_config(tmp_path, "kappa")
    plan = json.loads(vmrun("plan", "--json", str(cfg)).stdout)  # also warms the capability cache
    # The same command as QEMU gets it from vmrun, except that QEMU makes the QMP socket itself
    # (vmrun passes one it made): what the direct start lacks is vmrun's own work.
    direct_sock = tmp_path / "direct.sock"
    argv = [
        f"socket,id=vmrun-qmp,path={direct_sock},server=on,wait=off" if a.startswith("socket,id=vmrun-qmp,") else a
        for a in plan["argv"]
    ] + ["-S"]
    vm_sock = pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / "kappa" / "qmp.sock"
    direct, via_vmrun = [], []
    for _ in range(5):
        direct_sock.unlink(missing_ok=True)
        start = time.monotonic()
        q = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until_qmp_answers(direct_sock, q)
        direct.append(time.monotonic() - start)
        q.kill()
        q.wait()

        vm_sock.unlink(missing_ok=True)  # only this launch's socket counts
        start = time.monotonic()
        v = subprocess.Popen(
            [sys.executable, "-m", "vmrun.cli", "run", "--paused", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until_qmp_answers(vm_sock, v)
        via_vmrun.append(time.monotonic() - start)
        v.kill()
        v.wait()
    d, v_ = median(direct), median(via_vmrun)
    print(
        f"launch to first QMP answer, median of 5: QEMU directly {d * 1000:.0f} ms, "
        f"vmrun run {v_ * 1000:.0f} ms, ratio {v_ / d:.2f}"
    )
    assert v_ < d + 2.0


def test_completion_scripts_match_the_generator() -> None:
    for shell, name in (("bash", "vmrun.bash"), ("zsh", "_vmrun")):
        path = REPO / "contrib" / "completion" / name
        got = completion.script(cli.parser(), shell)
        if os.environ.get("VMRUN_REGEN_COMPLETION") == "1":
            path.write_text(got)
        assert path.exists() and path.read_text() == got, (
            f"{path} differs from `vmrun completion {shell}`: run with VMRUN_REGEN_COMPLETION=1 and review the diff"
        )
    proc = vmrun("completion", "bash")
    assert proc.returncode == 0 and proc.stdout == (REPO / "contrib" / "completion" / "vmrun.bash").read_text()


def complete_in_bash(words: str, bin_dir: pathlib.Path) -> list[str]:
    """What bash offers for the command line `words` plus TAB, with the checked-in script."""
    script = REPO / "contrib" / "completion" / "vmrun.bash"
    line = f"vmrun {words}"
    probe = f"""
source {script}
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<<"$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
_shtab_vmrun
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return sorted(w.strip() for w in proc.stdout.splitlines() if w.strip())


@QEMU_MARK
def test_bash_completes_commands_options_and_running_vm_names(
    launch: Callable[..., Running], tmp_path: pathlib.Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vmrun").write_text(f'#!/bin/sh\nexec {sys.executable} -m vmrun.cli "$@"\n')
    (bin_dir / "vmrun").chmod(0o755)
    assert complete_in_bash("st", bin_dir) == ["status", "stop"]
    assert "--timeout" in complete_in_bash("stop --", bin_dir)
    launch("lambda", "--paused")
    assert complete_in_bash("stop ", bin_dir) == ["lambda"]
    assert complete_in_bash("qmp la", bin_dir) == ["lambda"]


def test_systemd_unit(tmp_path: pathlib.Path) -> None:
    unit = REPO / "contrib" / "systemd" / "vmrun@.service"
    text = unit.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    assert settings["Type"] == "exec"
    assert settings["ExecStart"] == "vmrun run /etc/vmrun/%i.toml"
    assert settings["ExecStop"].lstrip("-") == "vmrun stop %i"
    assert "LimitMEMLOCK" not in settings
    # systemd's own SIGTERM/SIGKILL must not cut vmrun stop short: its timeout, the wait after
    # SIGKILL, and a margin.
    from vmrun.control import lifecycle

    assert int(settings["TimeoutStopSec"]) > cli.STOP_TIMEOUT + lifecycle.KILL_WAIT
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # Bad values are only warned about; a `vmrun` that systemd can find keeps that warning out.
    vmrun_bin = pathlib.Path(sys.executable).parent / "vmrun"
    copy = tmp_path / "vmrun@.service"
    copy.write_text(text.replace("=vmrun ", f"={vmrun_bin} ").replace("=-vmrun ", f"=-{vmrun_bin} "))
    check = subprocess.run(
        [analyze, "verify", "--man=no", f"{copy}:vmrun@demo.service"], capture_output=True, text=True, timeout=60
    )
    assert (check.returncode, check.stderr) == (0, "")
