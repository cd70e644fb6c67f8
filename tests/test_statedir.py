"""vmrun's state and data directories cannot be redirected, and `stop` signals only a
process proven to be the VM's QEMU. Each test plants what an attacker would."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, UNPRIVILEGED, is_root, plan_for
from tests.test_launch import config, run_recorded, run_refused
from vmrun.base import layout
from vmrun.base.errors import VmError
from vmrun.control import state
from vmrun.host import reader
from vmrun.kernel import statedir

needs_root = pytest.mark.skipif(not is_root(), reason="changing owners needs root")


def vmrun(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def base() -> pathlib.Path:
    path = pathlib.Path(os.environ["VMRUN_STATE_DIR"])
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def target(tmp_path: pathlib.Path) -> pathlib.Path:
    """Where an attacker's links point: must stay exactly as it is."""
    d = tmp_path / "target"
    d.mkdir()
    (d / "precious").write_text("root's file\n")
    return d


def untouched(target: pathlib.Path) -> None:
    assert sorted(p.name for p in target.iterdir()) == ["precious"]
    assert (target / "precious").read_text() == "root's file\n"


def test_symlinked_vm_directory_is_refused(
    base: pathlib.Path, target: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    (base / "t").symlink_to(target)
    stderr = run_refused(config(outdir, {"memlock": "off"}), outdir, host_tree)
    assert f"vmrun: {base}/t is a symlink: vmrun does not follow links" in stderr
    untouched(target)
    for command in (["ps", "--all"], ["status", "t"], ["stop", "t"]):
        proc = vmrun(*command)
        assert "Traceback" not in proc.stderr and "t " not in proc.stdout.split("\n", 1)[-1], (command, proc)
    untouched(target)


def test_symlinked_lock_and_planted_temp_files_are_not_followed(
    base: pathlib.Path, target: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    vm_dir = base / "t"
    vm_dir.mkdir(mode=0o700)
    (vm_dir / "lock").symlink_to(target / "precious")
    stderr = run_refused(config(outdir, {"memlock": "off"}), outdir, host_tree)
    assert f"vmrun: {vm_dir}/lock is a symlink: vmrun does not follow links in its own directories" in stderr
    untouched(target)
    # Links where the old launcher wrote its temp files: the launch writes past them.
    (vm_dir / "lock").unlink()
    for name in (".pid.tmp", ".state.json.tmp", "qmp.sock", "console.sock"):
        (vm_dir / name).symlink_to(target / "precious")
    record, _ = run_recorded(
        config(outdir, {"memlock": "off", "console": "socket"}), outdir, "--host-root", str(host_tree)
    )
    assert record["argv"]
    untouched(target)
    assert (vm_dir / "qmp.sock").is_socket() and not (vm_dir / "qmp.sock").is_symlink()
    assert json.loads((vm_dir / "state.json").read_text())["phase"] == "exec"


@needs_root
def test_base_of_another_owner_or_writable_by_others_is_refused(
    base: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    cfg = config(outdir, {"memlock": "off"})
    shutil.chown(base, "nobody")
    stderr = run_refused(cfg, outdir, host_tree)
    assert f"vmrun: {base} belongs to uid 65534, not to vmrun's user (uid 0)" in stderr
    assert list(base.iterdir()) == []
    shutil.chown(base, "root")
    base.chmod(0o777)
    stderr = run_refused(cfg, outdir, host_tree)
    assert f"vmrun: {base} may be written by others: owner uid 0, mode 0777" in stderr
    assert f"hint: chmod go-w {base}" in stderr
    assert vmrun("ps").returncode == 1


def test_no_predictable_state_directory_without_a_runtime_dir(
    tmp_path: pathlib.Path, standard_host: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMRUN_STATE_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert reader.state_base(1000) is None
    assert reader.state_base(0) == "/run/vmrun"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert reader.state_base(1000) == "/run/user/1000/vmrun"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "run/user/1000")  # relative: the XDG spec says ignore it
    assert reader.state_base(1000) is None
    monkeypatch.setenv("VMRUN_STATE_DIR", "state")  # sockets are connected to by path: made absolute
    assert reader.state_base(1000) == os.path.join(os.getcwd(), "state")
    monkeypatch.delenv("VMRUN_STATE_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[vm]\nname = "t"\nmemory = "64M"\n')
    p = plan_for(cfg, standard_host, launcher=UNPRIVILEGED)
    assert [pr.render() for pr in p.problems] == [
        "vm.name: no directory for the running VM's lock and sockets: XDG_RUNTIME_DIR is not set"
        " (set XDG_RUNTIME_DIR (a login session has it) or VMRUN_STATE_DIR to a directory of yours,"
        " or run vmrun as root)"
    ]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(VmError, match="no state directory: XDG_RUNTIME_DIR is not set"):
        state.base()


# vmrun as nobody with an empty environment: no XDG_RUNTIME_DIR, no VMRUN_STATE_DIR. The
# venv's interpreter lives where nobody may not look, so everything is imported as root first.
AS_NOBODY = """
import os, pwd, sys
import psutil
from vmrun import cli
from vmrun.config import loader
from vmrun.control import lifecycle, qmp, state
from vmrun.host import facts, reader
from vmrun.kernel import statedir
from vmrun.launch import launcher, plan_cache, start
from vmrun.plan import planner, render
from vmrun.tools import check
cli.parser()  # argparse imports more (shutil, locale) when it first builds a parser: as root, who can read them
nobody = pwd.getpwnam("nobody")
keep = os.environ.get("NOBODY_STATE_DIR")
os.environ.clear()
if keep:
    os.environ["VMRUN_STATE_DIR"] = keep
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
sys.exit(cli.main(sys.argv[1:]))
"""


@needs_root
def test_no_state_directory_for_nobody_without_a_runtime_dir(outdir: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"})
    cfg.chmod(0o644)
    # What vmrun once made for a caller without XDG_RUNTIME_DIR: /tmp/vmrun-UID. (Not any
    # /tmp/vmrun-*: tests running beside this one make their own temporary directories.)
    predictable = pathlib.Path(f"/tmp/vmrun-{pwd.getpwnam('nobody').pw_uid}")
    assert not predictable.exists()
    commands = [["ps"], ["ps", "--all", "--json"], ["status", "t"], ["stop", "t"], ["qmp", "t", "query-status"]]
    for command in commands:
        proc = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, *command], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (command, proc.stderr)
        assert proc.stderr == (
            f"vmrun {command[0]}: no state directory: XDG_RUNTIME_DIR is not set\n"
            "  hint: set XDG_RUNTIME_DIR or VMRUN_STATE_DIR (as when the VMs were started), or run vmrun as root\n"
        ), command
    proc = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "vm.name: no directory for the running VM's lock and sockets: XDG_RUNTIME_DIR is not set" in proc.stderr
    assert "VMRUN_STATE_DIR" in proc.stderr
    assert not (outdir / "record.json").exists()
    assert not predictable.exists(), "no predictable directory in /tmp"


def test_listen_refuses_a_socket_path_over_sun_path(tmp_path: pathlib.Path) -> None:
    # The bind itself would fit (it goes through /proc/self/fd/N), but clients connect by
    # the real path: a socket nobody can reach is refused before it is made.
    deep = tmp_path / ("d" * (layout.SUN_PATH_MAX - len(str(tmp_path)) - 10))
    deep.mkdir(mode=0o700)
    directory = os.open(deep, statedir.DIR_FLAGS)
    try:
        length = len(f"{deep}/qmp.sock")
        with pytest.raises(statedir.UnsafeDirectory, match=rf"is {length} bytes, over the 107 a unix socket path"):
            statedir.listen_unix(directory, str(deep), "qmp.sock")
        assert list(deep.iterdir()) == []
        # One byte shorter: 107 and the NUL fill sun_path exactly, and a client gets through.
        listener = socket.socket(fileno=statedir.listen_unix(directory, str(deep), "qmp.soc"))
        with listener, socket.socket(socket.AF_UNIX) as client:
            assert len(f"{deep}/qmp.soc") == 107
            client.connect(f"{deep}/qmp.soc")
        assert (deep / "qmp.soc").stat().st_mode & 0o777 == 0o600
    finally:
        os.close(directory)


def test_a_directory_in_place_of_a_record_is_a_clear_error(
    base: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    vm_dir = base / "t"
    vm_dir.mkdir(mode=0o700)
    (vm_dir / "lock").touch(mode=0o600)
    (vm_dir / "pid").mkdir()
    stderr = run_refused(config(outdir, {"memlock": "off"}), outdir, host_tree)
    assert f"vmrun: cannot remove {vm_dir}/pid of the last run: Is a directory" in stderr
    (vm_dir / "pid").rmdir()
    (vm_dir / "state.json").mkdir()
    stderr = run_refused(config(outdir, {"memlock": "off"}), outdir, host_tree)
    assert f"vmrun: cannot remove {vm_dir}/state.json of the last run: Is a directory" in stderr
    proc = vmrun("ps", "--all")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


def test_socket_path_longer_than_sun_path_is_a_plan_problem(
    tmp_path: pathlib.Path, standard_host: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMRUN_STATE_DIR", "/run/" + "x" * 90)
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[vm]\nname = "t"\nmemory = "64M"\n')
    problems = [pr.render() for pr in plan_for(cfg, standard_host).problems]
    assert problems == [
        f"vm.name: the VM's socket paths under /run/{'x' * 90}/t are 110 bytes, over the 107 a unix socket path"
        " may have (use a shorter vm.name or a shorter state directory (VMRUN_STATE_DIR))"
    ]


def test_fifo_as_lock_does_not_hang(base: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    (base / "t").mkdir(mode=0o700)
    os.mkfifo(base / "t" / "lock")
    start = time.monotonic()
    assert vmrun("ps", "--all").returncode == 0
    assert "is not a regular file" in vmrun("status", "t").stderr
    assert "is not a regular file" in run_refused(config(outdir, {"memlock": "off"}), outdir, host_tree)
    assert time.monotonic() - start < 15


def test_data_copy_does_not_follow_planted_links(tmp_path: pathlib.Path, target: pathlib.Path) -> None:
    data = tmp_path / "data"
    template = tmp_path / "template.fd"
    template.write_bytes(b"VARS" * 1024)
    (data / "vm").mkdir(parents=True, mode=0o700)
    (data / "vm" / "OVMF_VARS.fd").symlink_to(target / "precious")
    with pytest.raises(statedir.UnsafeDirectory, match="is a symlink"):
        statedir.open_data_copy(str(data), "vm", "OVMF_VARS.fd", str(template))
    untouched(target)
    (data / "vm" / "OVMF_VARS.fd").unlink()
    for pid in (os.getpid(), os.getpid() + 1):
        (data / "vm" / f"OVMF_VARS.fd.{pid}.tmp").symlink_to(target / "precious")
    fd = statedir.open_data_copy(str(data), "vm", "OVMF_VARS.fd", str(template))
    os.close(fd)
    assert (data / "vm" / "OVMF_VARS.fd").read_bytes() == template.read_bytes()
    assert (data / "vm" / "OVMF_VARS.fd").stat().st_mode & 0o777 == 0o600
    untouched(target)
    # A VM directory someone else may write into is not used.
    (data / "other").mkdir(mode=0o777)
    (data / "other").chmod(0o777)
    with pytest.raises(statedir.UnsafeDirectory, match="may be written by others"):
        statedir.open_data_copy(str(data), "other", "OVMF_VARS.fd", str(template))


@pytest.fixture
def flock_sleeper(base: pathlib.Path) -> Iterator[tuple[subprocess.Popen[bytes], pathlib.Path]]:
    """`flock -x lock sleep 300`: an unrelated process that holds the VM's lock."""
    vm_dir = base / "t"
    vm_dir.mkdir(mode=0o700)
    lock = vm_dir / "lock"
    lock.touch()
    proc = subprocess.Popen(["flock", "-x", str(lock), "sleep", "300"])
    deadline = time.monotonic() + 10
    while not state.lock_held(str(lock)):
        assert time.monotonic() < deadline, "flock did not take the lock"
        time.sleep(0.02)
    yield proc, vm_dir
    proc.kill()
    proc.wait()


def sleep_pid(flock: subprocess.Popen[bytes]) -> int:
    """The `sleep` that flock runs (and that holds the lock fd), a child of flock."""
    deadline = time.monotonic() + 10
    while True:
        children = pathlib.Path(f"/proc/{flock.pid}/task/{flock.pid}/children").read_text().split()
        if children:
            return int(children[0])
        assert time.monotonic() < deadline
        time.sleep(0.02)


def start_ticks(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def write_record(vm_dir: pathlib.Path, pid: int, **fields: object) -> None:
    """A state.json and pid file as `vmrun run` writes them, for process `pid`."""
    st = (vm_dir / "lock").stat()
    record = {
        "name": "t",
        "phase": "exec",
        "pid": pid,
        "start_ticks": start_ticks(pid),
        "exe": "/usr/bin/qemu-system-x86_64",
        "launcher": os.path.realpath(sys.executable),
        "argv": ["/usr/bin/qemu-system-x86_64", "-name", "guest=t"],
        "lock": [st.st_dev, st.st_ino],
        **fields,
    }
    (vm_dir / "state.json").write_text(json.dumps(record))
    (vm_dir / "pid").write_text(f"{pid}\n")


def removed(vm_dir: pathlib.Path) -> bool:
    return not (vm_dir / "state.json").exists() and not (vm_dir / "pid").exists()


@pytest.mark.parametrize(
    "forged, why",
    [
        ({"start_ticks": 1}, "is a later process than the one vmrun started"),
        ({}, "runs /usr/bin/sleep, not the recorded /usr/bin/qemu-system-x86_64"),
        ({"lock": [1, 2]}, "the lock file was replaced since the launch"),
    ],
    ids=["reused-pid", "not-qemu", "other-lock"],
)
def test_stop_never_signals_a_process_that_is_not_the_vms_qemu(
    flock_sleeper: tuple[subprocess.Popen[bytes], pathlib.Path], forged: dict[str, object], why: str
) -> None:
    flock, vm_dir = flock_sleeper
    victim = sleep_pid(flock)
    for command in (["stop", "t", "--timeout", "2"], ["status", "t"], ["qmp", "t", "quit"], ["ps", "--all"]):
        write_record(vm_dir, victim, **forged)
        proc = vmrun(*command)
        if command[0] == "ps":
            assert proc.returncode == 0 and re.search(r"^t +stale +- ", proc.stdout, re.M), proc.stdout
        else:
            assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
            assert "VM t is not running (stale state: " in proc.stderr and why in proc.stderr, proc.stderr
            assert "nothing was signalled" in proc.stderr
        assert flock.poll() is None and pathlib.Path(f"/proc/{victim}").exists(), "the unrelated process was hit"
        # A record that can never come true is removed: the next command finds none.
        assert removed(vm_dir), command
    assert (vm_dir / "lock").exists() and flock.poll() is None


def test_a_record_without_launcher_naming_a_lock_holder_is_stale_but_kept(
    flock_sleeper: tuple[subprocess.Popen[bytes], pathlib.Path],
) -> None:
    # Without the launcher's binary, a process that is not QEMU may be vmrun in its last
    # instant before exec: not the VM (nothing is signalled), but the record is left alone.
    flock, vm_dir = flock_sleeper
    victim = sleep_pid(flock)
    write_record(vm_dir, victim, launcher=None)
    proc = vmrun("stop", "t", "--timeout", "2")
    assert proc.returncode == 1
    assert f"(stale state: pid {victim} runs /usr/bin/sleep, not the recorded" in proc.stderr
    assert "nothing was signalled" in proc.stderr
    assert flock.poll() is None and pathlib.Path(f"/proc/{victim}").exists()
    assert (vm_dir / "state.json").exists()


def test_the_launching_vmrun_before_exec_is_starting(base: pathlib.Path) -> None:
    # This very process stands in for a `vmrun run` that holds the lock and has not yet
    # exec'ed QEMU: it must be told apart, and never signalled (this test would die).
    vm_dir = base / "t"
    vm_dir.mkdir(mode=0o700)
    lock = os.open(vm_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    me = os.readlink("/proc/self/exe")
    try:
        for phase in ("starting", "exec"):
            write_record(vm_dir, os.getpid(), phase=phase, launcher=me)
            vm = state.load("t")
            assert vm is not None and vm.state == "starting" and vm.identity is None, vm
            proc = vmrun("stop", "t")
            assert proc.returncode == 1 and "vmrun stop: VM t is starting: vmrun has its lock" in proc.stderr
            assert (vm_dir / "state.json").exists(), "a launch's record is not stale"
        # The same process, become neither vmrun nor QEMU: stale for good.
        write_record(vm_dir, os.getpid(), launcher="/usr/bin/not-vmrun")
        proc = vmrun("stop", "t")
        assert proc.returncode == 1 and f"pid {os.getpid()} runs {me}, not the recorded" in proc.stderr
        assert removed(vm_dir)
    finally:
        os.close(lock)


def test_a_live_process_without_the_lock_is_not_the_vm(
    flock_sleeper: tuple[subprocess.Popen[bytes], pathlib.Path],
) -> None:
    flock, vm_dir = flock_sleeper
    bystander = subprocess.Popen(["sleep", "300"])
    assert flock.poll() is None
    try:
        write_record(vm_dir, bystander.pid, exe=os.path.realpath("/usr/bin/sleep"))
        proc = vmrun("stop", "t", "--timeout", "2")
        assert proc.returncode == 1
        assert f"stale state: pid {bystander.pid} does not hold the VM's lock); nothing was signalled" in proc.stderr
        assert bystander.poll() is None
        assert not (vm_dir / "state.json").exists(), "the stale record is removed"
    finally:
        bystander.kill()
        bystander.wait()


def test_lock_held_by_a_process_that_wrote_no_record(
    flock_sleeper: tuple[subprocess.Popen[bytes], pathlib.Path],
) -> None:
    flock, vm_dir = flock_sleeper
    (vm_dir / "state.json").write_text(json.dumps({"pid": flock.pid, "started": time.time()}))
    proc = vmrun("stop", "t")
    assert proc.returncode == 1 and "state.json does not identify the launch" in proc.stderr
    assert flock.poll() is None


@needs_root
def test_a_process_vmrun_may_not_look_into_is_not_signalled(outdir: pathlib.Path) -> None:
    # vmrun as nobody, its VM's lock held by a process of root's: /proc/PID/fd is closed to
    # nobody, so nothing can prove what the process is, and nothing is signalled.
    nobody = pwd.getpwnam("nobody")
    base = outdir / "state"
    vm_dir = base / "t"
    vm_dir.mkdir(parents=True, mode=0o700)
    (vm_dir / "lock").touch(mode=0o600)
    for path in (base, vm_dir, vm_dir / "lock"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    flock = subprocess.Popen(["flock", "-x", str(vm_dir / "lock"), "sleep", "300"])
    try:
        victim = sleep_pid(flock)  # flock runs sleep once it holds the lock
        write_record(vm_dir, victim)
        os.chown(vm_dir / "state.json", nobody.pw_uid, nobody.pw_gid)
        os.chown(vm_dir / "pid", nobody.pw_uid, nobody.pw_gid)
        env = {**os.environ, "NOBODY_STATE_DIR": str(base)}
        why = f"cannot prove pid {victim} is the VM's QEMU: /proc/{victim}/fd is not readable for uid {nobody.pw_uid}"
        for command in (["stop", "t", "--timeout", "2"], ["status", "t"], ["qmp", "t", "quit"]):
            proc = subprocess.run(
                [sys.executable, "-c", AS_NOBODY, *command],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, (command, proc.stderr)
            assert f"vmrun {command[0]}: {why}; nothing was signalled" in proc.stderr, proc.stderr
        proc = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, "ps", "--all"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and re.search(r"^t +unknown +- ", proc.stdout, re.M), proc.stdout + proc.stderr
        assert flock.poll() is None and pathlib.Path(f"/proc/{victim}").exists(), "the process was hit"
        assert (vm_dir / "state.json").exists(), "what cannot be judged is not removed either"
    finally:
        flock.kill()
        flock.wait()


def test_a_trailing_slash_does_not_follow_a_symlinked_base(
    tmp_path: pathlib.Path, target: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # O_NOFOLLOW does not hold for "link/": the kernel resolves a trailing slash through the link.
    link = tmp_path / "base"
    link.symlink_to(target)
    for path in (str(link), f"{link}/", f"{link}//"):
        with pytest.raises(statedir.UnsafeDirectory, match=f"^{link} is a symlink"):
            os.close(statedir.open_dir(path, create=True))
    monkeypatch.setenv("VMRUN_STATE_DIR", f"{link}/")
    proc = vmrun("ps")
    assert proc.returncode == 1 and f"vmrun ps: {link} is a symlink" in proc.stderr, proc.stderr
    untouched(target)


@pytest.mark.parametrize(
    "plant, kind",
    [
        ("socket", "not a regular file but a socket"),
        ("directory", "not a regular file but a directory"),
        ("hardlink", "a regular file with 2 hard links"),
    ],
)
def test_a_lock_vmrun_did_not_make_is_refused(
    base: pathlib.Path,
    target: pathlib.Path,
    outdir: pathlib.Path,
    host_tree: pathlib.Path,
    plant: str,
    kind: str,
) -> None:
    vm_dir = base / "t"
    vm_dir.mkdir(mode=0o700)
    lock = vm_dir / "lock"
    if plant == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(lock))
    elif plant == "directory":
        lock.mkdir()
    else:  # another name of a file elsewhere: root's own, so the owner alone would pass
        os.link(target / "precious", lock)
    stderr = run_refused(config(outdir, {"memlock": "off"}), outdir, host_tree)
    assert f"vmrun: {lock} is {kind} " in stderr and "not one vmrun made" in stderr, stderr
    ps = vmrun("ps", "--all")
    assert ps.returncode == 0 and "Traceback" not in ps.stderr
    status = vmrun("status", "t")
    assert status.returncode == 1 and f"{lock} is {kind}" in status.stderr, status.stderr
    untouched(target)
    assert (target / "precious").stat().st_nlink == (2 if plant == "hardlink" else 1)
