"""The launch path for real: vmrun runs as a process and execs a QEMU stand-in that
records what it inherited, or real QEMU (TCG) booting the demo guest."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import pwd
import resource
import shlex
import shutil
import subprocess
import sys
import termios
import time
from typing import Any

import pytest
import tomli_w

from tests import fakehost
from tests.conftest import REPO, is_root
from vmrun.base.errors import LaunchError
from vmrun.base.sizes import MiB
from vmrun.launch.launcher import place_fds, set_memlock

FAKE_QEMU = REPO / "tests" / "fake-qemu"
needs_root = pytest.mark.skipif(not is_root(), reason="switching users needs root")


def vmrun(*args: str, redirects: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run vmrun as a caller would; `redirects` (shell syntax) opens fds it inherits."""
    command = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "vmrun.cli", *args))
    return subprocess.run(
        ["/bin/sh", "-c", f"exec {redirects} {command}" if redirects else f"exec {command}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def config(outdir: pathlib.Path, vm: dict[str, Any], **sections: Any) -> pathlib.Path:
    """A config whose QEMU is the stand-in in `outdir`; it records into outdir/record.json."""
    path = outdir / "vm.toml"
    env = {"VMRUN_FAKE_QEMU_OUT": str(outdir / "record.json"), **vm.pop("env", {})}
    settings = {"name": "t", "memory": "64M", "qemu": str(outdir / "fake-qemu"), "env": env, **vm}
    path.write_text(tomli_w.dumps({"vm": settings, **sections}))
    return path


def run_recorded(
    cfg: pathlib.Path, outdir: pathlib.Path, *extra: str, redirects: str = ""
) -> tuple[dict[str, Any], float]:
    out = outdir / "record.json"
    start = time.time()
    proc = vmrun("run", str(cfg), *extra, redirects=redirects)
    assert proc.returncode == 0, proc.stderr
    record: dict[str, Any] = json.loads(out.read_text())
    return record, record["time"] - start


def run_refused(cfg: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path) -> str:
    """Run a launch that must fail before exec: exit 1, no traceback, QEMU never started."""
    out = outdir / "record.json"
    proc = vmrun("run", str(cfg), "--host-root", str(host_tree))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "QEMU ran although the launch should have stopped before exec"
    return proc.stderr


TWO_DEVICES = {
    "iommufd": [{"id": "iommufd0"}],
    "vfio": [
        {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0"},
        {"id": "dev1", "host": "0000:02:00.0", "iommufd": "iommufd0"},
    ],
}


@needs_root
def test_child_gets_exactly_the_planned_fds_limit_and_identity(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    cfg = config(outdir, {"user": "nobody", "memlock": "6M"}, **TWO_DEVICES)
    # Junk the launcher holds without CLOEXEC, on the planned numbers and above them:
    # none of it may reach QEMU, and the planned files must win the numbers.
    junk = "3</dev/null 4</dev/null 5</dev/null 9</dev/null"
    record, _ = run_recorded(cfg, outdir, "--host-root", str(host_tree), redirects=junk)
    assert record["fds"] == {
        "0": record["fds"]["0"],
        "1": record["fds"]["1"],
        "2": record["fds"]["2"],
        "3": str(host_tree / "dev" / "iommu"),
        "4": str(host_tree / "dev" / "vfio" / "devices" / "vfio0"),
        "5": str(host_tree / "dev" / "vfio" / "devices" / "vfio1"),
        "6": record["fds"]["6"],
        "7": record["fds"]["7"],
    }
    assert record["fds"]["6"].endswith("/state/t/lock") and record["fds"]["7"].startswith("socket:")
    nobody = pwd.getpwnam("nobody")
    assert (record["uid"], record["euid"], record["gid"]) == (
        nobody.pw_uid,
        nobody.pw_uid,
        nobody.pw_gid,
    )
    assert record["groups"] == [nobody.pw_gid]
    assert record["cap_eff"] == "0000000000000000"
    assert record["memlock"] == [6 * MiB, 6 * MiB]
    assert "iommufd,id=iommufd0,fd=3" in record["argv"]
    assert "vfio-pci,id=dev1,fd=5,iommufd=iommufd0" in record["argv"]
    # What `vmrun ps` and `stop` read: QEMU's pid (exec keeps vmrun's) and the devices.
    state = json.loads((pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / "t" / "state.json").read_text())
    assert state["pid"] == record["pid"] and state["argv"] == record["argv"] and state["run_as"] == "nobody"
    assert state["devices"] == [
        {"id": "dev0", "driver": "vfio-pci", "source": "host=0000:01:00.0", "backend": "iommufd0"},
        {"id": "dev1", "driver": "vfio-pci", "source": "host=0000:02:00.0", "backend": "iommufd0"},
    ]


def test_caller_fds_pass_through_at_their_numbers(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    sections = {
        "iommufd": [{"id": "iommufd0", "fd": 7}],
        "vfio": [
            {"id": "dev0", "fd": 8, "iommufd": "iommufd0"},
            {"id": "dev1", "host": "0000:02:00.0", "iommufd": "iommufd0"},
        ],
    }
    cfg = config(outdir, {"memlock": "off"}, **sections)
    mine = tmp_path / "caller-iommu"
    mine.write_text("")
    redirects = f"7<>{shlex.quote(str(mine))} 8<>{shlex.quote(str(mine))}"
    record, _ = run_recorded(cfg, outdir, "--host-root", str(host_tree), redirects=redirects)
    assert record["fds"]["7"] == str(mine) and record["fds"]["8"] == str(mine)
    assert record["fds"]["3"] == str(host_tree / "dev" / "vfio" / "devices" / "vfio1")
    assert sorted(record["fds"], key=int) == ["0", "1", "2", "3", "4", "5", "7", "8"]


def test_caller_fd_not_open_is_reported_before_exec(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    cfg = config(outdir, {"memlock": "off"}, iommufd=[{"id": "iommufd0", "fd": 40}], vfio=[])
    stderr = run_refused(cfg, outdir, host_tree)
    assert "vmrun: fd 40 (iommufd iommufd0 (from the caller)) is not open in vmrun's process" in stderr


def test_caller_fd_is_not_mistaken_for_one_vmrun_opened(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    # vmrun's own descriptors (the opener's socket, the state directory) take the lowest
    # free numbers: a config naming fd 3 or 4 that the caller did not pass must be refused,
    # not filled with one of those.
    # A disk, so the opener's socket is open while the launch checks the caller's fds.
    image = outdir / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    image.chmod(0o666)
    vm: dict[str, Any] = {"memlock": "off", **({"user": "nobody"} if is_root() else {})}
    for fd in (3, 4, 5):
        cfg = config(
            outdir, dict(vm), iommufd=[{"id": "iommufd0", "fd": fd}], vfio=[], disk=[{"id": "d0", "path": str(image)}]
        )
        stderr = run_refused(cfg, outdir, host_tree)
        assert f"vmrun: fd {fd} (iommufd iommufd0 (from the caller)) is not open in vmrun's process" in stderr


def test_unopenable_device_is_reported_before_exec(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    # The plan sees the node; opening it fails (as a busy or vanished device would).
    victim = host_tree / "dev" / "vfio" / "devices" / "vfio1"
    victim.unlink()
    victim.mkdir()
    proc = vmrun("run", str(cfg), "--host-root", str(host_tree))
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert first.startswith(
        "vmrun: cannot open /dev/vfio/devices/vfio1 for vfio-pci dev1 (host=0000:02:00.0): Is a directory"
    )
    assert "Traceback" not in proc.stderr


def test_unopenable_disk_is_reported_before_exec(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    image = tmp_path / "image.raw"
    image.mkdir()  # the plan opens it as the launch would, and says why it cannot
    cfg = config(outdir, {"memlock": "off"}, disk=[{"id": "d0", "path": str(image)}])
    stderr = run_refused(cfg, outdir, host_tree)
    assert f"disk[0].path: {image}: it is a directory, not an image file or block device" in stderr


def test_tap_that_cannot_be_attached_is_reported_before_exec(tmp_path: pathlib.Path, outdir: pathlib.Path) -> None:
    # The fake tree's /dev/net/tun is a plain file: TUNSETIFF fails on it as on a real
    # tap owned by another user.
    root = fakehost.build(tmp_path / "host", fakehost.FakeHost(taps=("tap0",)))
    cfg = config(outdir, {"memlock": "off"}, net=[{"id": "n0", "type": "tap", "ifname": "tap0"}])
    stderr = run_refused(cfg, outdir, root)
    assert "vmrun: cannot attach to tap tap0: Inappropriate ioctl for device" in stderr
    assert "ip tuntap add tap0 mode tap user USER" in stderr


def test_plan_problems_stop_the_launch(tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {}, vfio=[{"id": "dev0", "host": "0000:07:00.0"}])
    assert "vfio[0].host: no PCI device 0000:07:00.0 on this host" in run_refused(cfg, outdir, host_tree)


def test_run_to_exec_time(tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    vmrun("plan", str(cfg), "--host-root", str(host_tree))  # warm the capability cache
    times = sorted(run_recorded(cfg, outdir, "--host-root", str(host_tree))[1] for _ in range(5))
    print(f"vmrun run -> exec of QEMU (incl. python start of both): median {times[2] * 1000:.0f} ms")
    assert times[2] < 2.0


def in_child(fn: Any) -> tuple[int, str]:
    """Run fn() in a forked child (its process-wide changes stay there): (status, message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            os.write(w, b"ok")
            os._exit(0)
        except BaseException as e:
            os.write(w, str(e).encode())
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as f:
        message = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), message


@needs_root
def test_memlock_above_hard_limit_fails_clearly_when_unprivileged() -> None:
    def unprivileged_raise() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (4 * MiB, 4 * MiB))
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        set_memlock(64 * MiB)

    status, message = in_child(unprivileged_raise)
    assert status == 1
    assert message.startswith("cannot set RLIMIT_MEMLOCK to 64 MiB: the hard limit is 4 MiB")


def test_place_fds_handles_collisions() -> None:
    def collide() -> None:
        # Opened fds sitting on each other's target numbers must not clobber each other.
        a = os.open("/dev/null", os.O_RDONLY)
        b = os.open("/proc/self/status", os.O_RDONLY)
        c = os.open("/proc/version", os.O_RDONLY)
        place_fds({b: a, a: b, 100: c}, [])
        names = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in (a, b, 100)}
        assert names[b] == "/dev/null" and names[a].endswith("/status") and names[100] == "/proc/version", names
        assert all(os.get_inheritable(fd) for fd in (a, b, 100))

    assert in_child(collide) == (0, "ok")


def test_launch_error_is_printable() -> None:
    assert str(LaunchError("x failed", "do y")) == "x failed\n  hint: do y"


@pytest.mark.qemu
def test_demo_boots_and_prints_its_line() -> None:
    demo = REPO / "configs" / "demo.toml"
    if not (REPO / "build" / "demo" / "vmlinuz").exists():
        pytest.fail("build/demo is missing: scripts/install builds the demo guest")
    start = time.monotonic()
    proc = vmrun("run", str(demo))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "vmrun-demo: guest up" in proc.stdout, proc.stdout + proc.stderr
    print(f"demo boot to power-off under TCG: {elapsed:.1f} s")


@needs_root
def test_qemu_gets_a_minimal_environment_no_capabilities_and_no_new_privileges(
    outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    cfg = config(outdir, {"user": "nobody", "memlock": "6M", "env": {"GREETING": "hi, there"}}, **TWO_DEVICES)
    os.environ["VMRUN_TEST_SECRET"] = "root's token"
    try:
        record, _ = run_recorded(cfg, outdir, "--host-root", str(host_tree))
    finally:
        del os.environ["VMRUN_TEST_SECRET"]
    assert record["env"] == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": pwd.getpwnam("nobody").pw_dir,
        "USER": "nobody",
        "LOGNAME": "nobody",
        "LANG": "C.UTF-8",
        "VMRUN_FAKE_QEMU_OUT": str(outdir / "record.json"),
        "GREETING": "hi, there",
    }
    zero = "0000000000000000"
    assert (record["cap_eff"], record["cap_prm"], record["cap_bnd"], record["cap_amb"]) == (zero, zero, zero, zero)
    assert record["no_new_privs"] == "1"
    sandbox = record["argv"].index("-sandbox")
    assert record["argv"][sandbox + 1] == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def test_sandbox_can_be_turned_off(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off", "sandbox": False})
    record, _ = run_recorded(cfg, outdir, "--host-root", str(host_tree))
    assert "-sandbox" not in record["argv"]


@needs_root
def test_qemu_is_probed_as_the_vm_user_with_a_minimal_environment(
    outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    for user in ("nobody", None):
        (outdir / "probes.log").unlink(missing_ok=True)
        vm: dict[str, Any] = {"memlock": "off", "name": f"probe-{user}"}
        if user:
            vm["user"] = user
        cfg = config(outdir, vm)
        # A fresh cache, so the probes really run.
        env = {**os.environ, "VMRUN_CACHE_DIR": str(outdir / f"cache-{user}"), "VMRUN_TEST_SECRET": "x"}
        proc = vmrun("plan", str(cfg), "--host-root", str(host_tree), env=env)
        assert proc.returncode == 0, proc.stderr
        probes = [json.loads(line) for line in (outdir / "probes.log").read_text().splitlines()]
        assert len(probes) >= 3
        # vmrun is root; with no vm.user the probes still run as nobody, never as root.
        assert {p["uid"] for p in probes} == {pwd.getpwnam("nobody").pw_uid}
        assert all(set(p["env"]) <= {"PATH", "LC_ALL", "HOME"} for p in probes), probes


def run_on_terminal(argv: list[str], leader: bool) -> None:
    """Run argv with a new pseudo-terminal as its controlling terminal, as a login shell has.

    leader: argv itself leads the session; otherwise a shell leads it and argv is its child.
    """
    master, slave = os.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    command = argv if leader else ["/bin/sh", "-c", shlex.join(argv) + "; exit $?"]
    try:
        proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_terminal, cwd=REPO)
        os.close(slave)
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break  # EIO: every process let go of the terminal
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=60) == 0, output.decode(errors="replace")
    finally:
        os.close(master)


@needs_root
@pytest.mark.parametrize("leader", [True, False], ids=["vmrun-leads-the-session", "shell-leads-the-session"])
def test_qemu_cannot_push_keystrokes_into_roots_terminal(
    outdir: pathlib.Path, host_tree: pathlib.Path, leader: bool
) -> None:
    cfg = config(outdir, {"user": "nobody", "memlock": "off", "console": "stdio"})
    run_on_terminal([sys.executable, "-m", "vmrun.cli", "run", str(cfg), "--host-root", str(host_tree)], leader)
    record = json.loads((outdir / "record.json").read_text())
    assert record["tty_nr"] == 0, "QEMU kept root's terminal as its controlling terminal"
    assert record["tiocsti"] is not None and record["tiocsti"] != "ok", "TIOCSTI went through"


@needs_root
def test_vnc_listens_on_a_unix_socket_only_root_can_reach(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"user": "nobody", "memlock": "off", "display": "vnc"})
    record, _ = run_recorded(cfg, outdir, "--host-root", str(host_tree))
    vnc = record["argv"][record["argv"].index("-vnc") + 1]
    assert vnc.startswith("unix:/proc/self/fd/") and vnc.endswith("/vnc.sock")
    fd = vnc.split("/")[4]
    state = pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / "t"
    assert record["fds"][fd] == str(state / "vnc")
    st = (state / "vnc").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam("nobody").pw_uid, 0o700)
    assert state.stat().st_mode & 0o077 == 0, "the state directory stays root's alone"
    assert not any(a.startswith("127.0.0.1:") or "to=99" in a for a in record["argv"])


@needs_root
def test_disk_as_the_vm_user_and_a_trusted_one(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    secret = outdir / "secret.raw"
    secret.write_text("root's secret")
    secret.chmod(0o600)
    (outdir / "link.raw").symlink_to(secret)
    # The symlink to a root-only file is refused before anything is opened.
    cfg = config(outdir, {"user": "nobody", "memlock": "off"}, disk=[{"id": "d0", "path": str(outdir / "link.raw")}])
    stderr = run_refused(cfg, outdir, host_tree)
    assert f"disk[0].path: {outdir}/link.raw: nobody may not open it: Permission denied" in stderr
    # The config says explicitly that root may open it: QEMU gets the fd, and only that.
    cfg = config(
        outdir,
        {"user": "nobody", "memlock": "off", "env": {"VMRUN_FAKE_QEMU_READ": str(secret)}},
        disk=[{"id": "d0", "path": str(secret), "trusted": True}],
    )
    record, _ = run_recorded(cfg, outdir, "--host-root", str(host_tree))
    assert str(secret) in record["fds"].values()
    assert record["read"] == "errno 13", "QEMU itself still may not open the file by path"


@needs_root
def test_named_uefi_vars_are_made_as_the_vm_user(outdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "host", fakehost.FakeHost(uefi=True))
    template = pathlib.Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    if not template.exists():
        pytest.fail("ovmf is missing: scripts/install installs it")
    store = outdir / "vars" / "VARS.fd"
    store.parent.mkdir()
    shutil.chown(store.parent, "nobody")
    cfg = config(outdir, {"user": "nobody", "memlock": "off", "firmware": "uefi", "uefi_vars": str(store)})
    run_recorded(cfg, outdir, "--host-root", str(root))
    assert store.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert store.read_bytes() == template.read_bytes()
