"""Disks, networking, UEFI, the console socket and vIOMMUs on real QEMU (TCG).

Each VM is started by `vmrun run` paused (-S), inspected over the QMP socket that vmrun
made, and quit; or booted to the demo guest's line where booting is the point.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import tomli_w

from tests.conftest import REPO, is_root

DEMO = REPO / "build" / "demo"
pytestmark = pytest.mark.qemu


class Qmp:
    """Just enough QMP for tests: vmrun's own commands are tested elsewhere."""

    def __init__(self, path: pathlib.Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.run("qmp_capabilities")

    def run(self, command: str, **arguments: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def state(tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.environ["VMRUN_STATE_DIR"])


@contextlib.contextmanager
def running(cfg: pathlib.Path, state: pathlib.Path, name: str) -> Iterator[tuple[subprocess.Popen[str], Qmp]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmrun.cli", "run", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        qmp = Qmp(state / name / "qmp.sock")
    except OSError:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"QEMU did not come up: {err}{out}")
    try:
        yield proc, qmp
    finally:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            qmp.run("quit")
        qmp.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write(tmp_path: pathlib.Path, vm: dict[str, Any], **sections: Any) -> pathlib.Path:
    path = tmp_path / "vm.toml"
    base = {"name": "dev", "memory": "128M", "accel": "tcg", "console": "none", "memlock": "off"}
    path.write_text(tomli_w.dumps({"vm": {**base, **vm}, **sections}))
    return path


def peripherals(qmp: Qmp) -> set[str]:
    return {p["name"] for p in qmp.run("qom-list", path="/machine/peripheral")}


@pytest.fixture
def root_only_image() -> Iterator[pathlib.Path]:
    # Outside pytest's 0700 tree on purpose: what keeps nobody out must be the file's mode.
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-img-"))
    d.chmod(0o755)
    image = d / "secret.raw"
    for path in (image, d / "other.raw"):
        path.write_bytes(b"\0" * (1 << 20))
        path.chmod(0o600)
    yield image
    shutil.rmtree(d)


@pytest.mark.skipif(not is_root(), reason="needs root to run QEMU as nobody")
def test_disk_passed_as_fd_to_a_deprivileged_qemu(
    tmp_path: pathlib.Path, state: pathlib.Path, root_only_image: pathlib.Path
) -> None:
    cfg = write(
        tmp_path,
        {"user": "nobody", "args": ["-S"]},
        # Root-only images reach QEMU only because the config says so (trusted).
        disk=[
            {"id": "secret", "path": str(root_only_image), "trusted": True},
            {
                "id": "ro",
                "path": str(root_only_image.with_name("other.raw")),
                "interface": "nvme",
                "readonly": True,
                "trusted": True,
            },
        ],
    )
    with running(cfg, state, "dev") as (proc, qmp):
        nodes = {n["node-name"]: n for n in qmp.run("query-named-block-nodes")}
        assert nodes["secret-file"]["file"] == "/dev/fdset/1"
        assert nodes["ro-fmt"]["ro"] is True and nodes["secret-fmt"]["ro"] is False
        assert {"secret", "ro"} <= peripherals(qmp)
        # QEMU runs as nobody, who may not open the image: it works through the fd alone.
        assert psutil.Process(proc.pid).uids().real == 65534
        assert (root_only_image.stat().st_mode & 0o777, root_only_image.stat().st_uid) == (0o600, 0)


@pytest.mark.skipif(not is_root(), reason="needs root to run QEMU as nobody")
def test_backing_chain_passed_as_fds_to_a_deprivileged_qemu(
    tmp_path: pathlib.Path, state: pathlib.Path, root_only_image: pathlib.Path
) -> None:
    # raw base <- qcow2 middle <- qcow2 top, all root 0600: QEMU as nobody can open none of
    # them by the paths in the headers, so every layer must arrive as an fd.
    d = root_only_image.parent
    steps = [
        ["create", "-f", "qcow2", "-b", "secret.raw", "-F", "raw", "mid.qcow2"],
        ["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
    ]
    for step in steps:
        subprocess.run(["qemu-img", *step], cwd=d, check=True, capture_output=True)
    for name in ("mid.qcow2", "top.qcow2"):
        (d / name).chmod(0o600)
    cfg = write(
        tmp_path,
        {"user": "nobody", "args": ["-S"]},
        disk=[{"id": "root", "path": str(d / "top.qcow2"), "format": "qcow2", "trusted": True}],
    )
    with running(cfg, state, "dev") as (proc, qmp):
        nodes = {n["node-name"]: n for n in qmp.run("query-named-block-nodes")}
        assert (nodes["root-fmt"]["drv"], nodes["root-b1-fmt"]["drv"], nodes["root-b2-fmt"]["drv"]) == (
            "qcow2",
            "qcow2",
            "raw",
        )
        assert nodes["root-b1-fmt"]["ro"] and nodes["root-b2-fmt"]["ro"] and not nodes["root-fmt"]["ro"]
        assert nodes["root-fmt"]["backing_file_depth"] == 2
        assert psutil.Process(proc.pid).uids().real == 65534


@pytest.mark.skipif(not is_root(), reason="needs root to run QEMU as nobody")
@pytest.mark.parametrize("cache", ["none", "unsafe", "writeback"])
def test_every_cache_mode_starts_on_a_backing_chain(
    tmp_path: pathlib.Path, state: pathlib.Path, root_only_image: pathlib.Path, cache: str
) -> None:
    """cache = "none" is O_DIRECT: QEMU takes from an fd set only an fd opened that way, for
    the image and each layer under it, read-write and read-only."""
    d = root_only_image.parent
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", "secret.raw", "-F", "raw", "top.qcow2"],
        cwd=d,
        check=True,
        capture_output=True,
    )
    disks = [
        {"id": "root", "path": str(d / "top.qcow2"), "format": "qcow2", "cache": cache, "trusted": True},
        {"id": "ro", "path": str(d / "other.raw"), "readonly": True, "cache": cache, "trusted": True},
    ]
    cfg = write(tmp_path, {"user": "nobody", "args": ["-S"]}, disk=disks)
    with running(cfg, state, "dev") as (proc, qmp):
        nodes = {n["node-name"]: n for n in qmp.run("query-named-block-nodes")}
        for node in ("root-file", "root-b1-file", "ro-file"):
            assert nodes[node]["cache"]["direct"] is (cache == "none"), (node, nodes[node]["cache"])
            assert nodes[node]["cache"]["no-flush"] is (cache == "unsafe"), (node, nodes[node]["cache"])
        flags = []
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            if target.startswith(str(d)):
                info = pathlib.Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text()
                flags.append(int(info.split("flags:")[1].split()[0], 8))
        assert len(flags) >= 3 and all(bool(f & os.O_DIRECT) is (cache == "none") for f in flags), flags


def test_user_network_forwards_a_port(tmp_path: pathlib.Path, state: pathlib.Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write(tmp_path, {"args": ["-S"]}, net=[{"id": "net0", "forwards": [f"tcp:{port}:22"]}])
    with running(cfg, state, "dev") as (proc, qmp):
        assert "net0" in peripherals(qmp)
        assert qmp.run("qom-get", path="/machine/peripheral/net0", property="mac").startswith("52:54:00:")
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"]
        assert ("127.0.0.1", port) in [(a.ip, a.port) for a in listening]


def demo(vm: dict[str, Any]) -> dict[str, Any]:
    if not (DEMO / "vmlinuz").exists():
        pytest.fail("build/demo is missing: scripts/install builds the demo guest")
    return {
        "kernel": str(DEMO / "vmlinuz"),
        "initrd": str(DEMO / "initrd"),
        "append": "console=ttyS0 quiet panic=-1",
        "args": ["-no-reboot"],
        **vm,
    }


def boot(cfg: pathlib.Path, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "vmrun.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_uefi_boots_the_demo_and_keeps_its_own_vars(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pathlib.Path("/usr/share/qemu/firmware").is_dir():
        pytest.fail("OVMF is not installed: scripts/install installs ovmf")
    monkeypatch.setenv("VMRUN_DATA_DIR", str(tmp_path / "data"))
    cfg = write(tmp_path, demo({"firmware": "uefi", "console": "stdio", "memory": "256M"}))
    start = time.monotonic()
    out = boot(cfg)
    assert "vmrun-demo: guest up" in out, out
    vars_copy = tmp_path / "data" / "dev" / "OVMF_VARS.fd"
    assert vars_copy.stat().st_size > 0 and (vars_copy.stat().st_mode & 0o777) == 0o600
    print(f"UEFI boot of the demo under TCG: {time.monotonic() - start:.1f} s")


def test_console_on_a_socket(tmp_path: pathlib.Path, state: pathlib.Path) -> None:
    cfg = write(tmp_path, demo({"console": "socket", "memory": "256M", "args": ["-no-reboot", "-S"]}))
    with running(cfg, state, "dev") as (_, qmp):
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.connect(str(state / "dev" / "console.sock"))
        qmp.run("cont")
        seen = b""
        console.settimeout(60)
        while b"vmrun-demo: guest up" not in seen:
            chunk = console.recv(4096)
            if not chunk:
                break
            seen += chunk
        console.close()
        assert b"vmrun-demo: guest up" in seen, seen[-500:]


@pytest.mark.parametrize("viommu", ["intel", "virtio"])
def test_viommu_guest_boots(tmp_path: pathlib.Path, viommu: str) -> None:
    cfg = write(tmp_path, demo({"viommu": viommu, "console": "stdio", "memory": "256M"}))
    assert "vmrun-demo: guest up" in boot(cfg)


def test_second_run_of_a_running_vm_is_refused(tmp_path: pathlib.Path, state: pathlib.Path) -> None:
    cfg = write(tmp_path, {"args": ["-S"]})
    with running(cfg, state, "dev") as (proc, _):
        again = subprocess.run(
            [sys.executable, "-m", "vmrun.cli", "run", str(cfg)], cwd=REPO, capture_output=True, text=True
        )
        assert again.returncode == 1
        assert f"vmrun: VM dev is already running (pid {proc.pid})" in again.stderr


@pytest.fixture
def tap() -> Iterator[str]:
    name = f"vmrt{os.getpid() % 100000}"
    made = subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a tap here: {made.stderr.strip()}")
    subprocess.run(["ip", "link", "set", "dev", name, "up"], check=True)
    yield name
    subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], check=True)


@pytest.mark.skipif(not is_root(), reason="needs root to make a tap and run QEMU as nobody")
def test_tap_attached_by_vmrun_for_a_deprivileged_qemu(tmp_path: pathlib.Path, state: pathlib.Path, tap: str) -> None:
    # QEMU as nobody could neither open /dev/net/tun nor attach to a root-owned tap itself.
    cfg = write(tmp_path, {"user": "nobody", "args": ["-S"]}, net=[{"id": "net0", "type": "tap", "ifname": tap}])
    carrier = pathlib.Path("/sys/class/net") / tap / "carrier"
    assert carrier.read_text().strip() == "0", "an unattached tap has no carrier"
    with running(cfg, state, "dev") as (proc, qmp):
        assert "net0" in peripherals(qmp)
        assert psutil.Process(proc.pid).uids().real == 65534
        fds = {os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")}
        assert "/dev/net/tun" in fds
        # The tap has a carrier only while a process is attached to it: QEMU, through vmrun's fd.
        assert carrier.read_text().strip() == "1"
