"""`vmrun attach` / `vmrun detach`.

Most tests run a stand-in QEMU (tests/fake-qmp-qemu) that vmrun really launches: it holds
the lock, serves QMP on vmrun's socket, receives the fds vmrun passes and keeps a model
of what each command created, checking references as QEMU does. That shows every step
and every undo. The last test boots the demo guest on real QEMU and watches a disk and a
nic come and go from inside the guest; the nested bed does the same for a VFIO device.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import tomli_w

from tests.conftest import REPO, LocalUsers, is_root
from tests.test_lifecycle import Running
from tests.test_vm_devices import tap

__all__ = ["tap"]  # a fixture

FRAGMENT = "frag.toml"


@pytest.fixture
def world() -> Iterator[pathlib.Path]:
    """A directory QEMU's stand-in (run as root or nobody) can read and write: its own
    copy, its log, the configs and images."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-attach-"))
    d.chmod(0o1777)  # sticky, as /tmp: the configs in it pass the trust rule
    for name in ("fake-qemu", "fake-qmp-qemu"):
        shutil.copy(REPO / "tests" / name, d / name)
        (d / name).chmod(0o755)
    yield d
    shutil.rmtree(d)


def vmrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


class FakeVm(Running):
    def __init__(
        self, world: pathlib.Path, name: str, vm: dict[str, Any], sections: dict[str, Any], *extra: str
    ) -> None:
        self.world = world
        self.log = world / f"{name}.qmp.log"
        env = {"VMRUN_FAKE_QMP_LOG": str(self.log), **vm.pop("env", {})}
        settings = {
            "name": name,
            "memory": "64M",
            "accel": "tcg",
            "console": "none",
            "memlock": "off",
            "qemu": str(world / "fake-qmp-qemu"),
            "env": env,
            **vm,
        }
        cfg = world / f"{name}.toml"
        cfg.write_text(tomli_w.dumps({"vm": settings, **sections}))
        cfg.chmod(0o644)
        super().__init__(cfg, name, *extra)
        self.wait_running()

    def wait_running(self, timeout: float = 30) -> None:
        from vmrun.control import qmp, state

        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vmrun run exited: {self.output()}"
            vm = state.load(self.name)
            last = vm and (vm.state, vm.why, vm.pid)
            if vm is not None and vm.running and vm.pid == self.pid:
                try:
                    qmp.execute(vm.qmp_socket, "query-status")
                    return
                except qmp.QmpError as e:
                    last = e
            time.sleep(0.05)
        log = self.log.read_text() if self.log.exists() else "(no log)"
        d = pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / self.name
        files = {f.name: f.read_text()[:300] for f in d.iterdir() if f.is_file()} if d.exists() else {}
        raise AssertionError(f"{self.name} did not come up: {last}; {self.output()}; log: {log}; files: {files}")

    def commands(self) -> list[dict[str, Any]]:
        """What QEMU was asked since the launch, minus vmrun's own checks of the VM."""
        if not self.log.exists():
            return []
        entries = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e for e in entries if e["cmd"] not in ("qmp_capabilities", "query-status")]

    def changes(self) -> list[str]:
        """The commands that change QEMU, as "cmd ident" (failed ones marked)."""
        out = []
        for e in self.commands():
            if e["cmd"].startswith("query-") or e["cmd"] == "qom-list":
                continue
            a = e["args"]
            ident = next((a[k] for k in ("id", "node-name", "fdname", "fdset-id", "opaque") if k in a), None)
            out.append(f"{e['cmd']} {ident}" + ("" if e["ok"] else " FAILED"))
        return out

    def model(self) -> dict[str, Any]:
        from vmrun.control import qmp, state

        vm = state.running(self.name)
        result: dict[str, Any] = qmp.execute(vm.qmp_socket, "x-fake-state")
        return result

    def attached(self) -> list[dict[str, Any]]:
        from vmrun.control import state

        vm = state.running(self.name)
        record = json.loads((pathlib.Path(vm.state_dir) / "state.json").read_text())
        return list(record.get("attached", []))


EMPTY: dict[str, Any] = {
    "fds": {},
    "fdsets": {},
    "objects": {},
    "nodes": {},
    "netdevs": {},
    "devices": {},
    "unplugging": [],
}


@pytest.fixture
def fake_vm(world: pathlib.Path) -> Iterator[Callable[..., FakeVm]]:
    started: list[FakeVm] = []

    def start(
        name: str = "t", sections: dict[str, Any] | None = None, host_root: pathlib.Path | None = None, **vm: Any
    ) -> FakeVm:
        r = FakeVm(world, name, vm, sections or {}, *(["--host-root", str(host_root)] if host_root else []))
        started.append(r)
        return r

    yield start
    for r in started:
        r.end()


def fragment(world: pathlib.Path, **sections: Any) -> pathlib.Path:
    path = world / FRAGMENT
    path.write_text(tomli_w.dumps(sections))
    path.chmod(0o644)
    return path


def image_chain(world: pathlib.Path) -> pathlib.Path:
    """A qcow2 image on a backing file, readable and writable by nobody."""
    base, top = world / "base.qcow2", world / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)], check=True, cwd=world
    )
    for p in (base, top):
        p.chmod(0o666)
    return top


def everything(world: pathlib.Path) -> pathlib.Path:
    """A fragment with one of each: a new iommufd object and a VFIO device on it, a disk on
    a backing file, a nic."""
    image_chain(world)
    return fragment(
        world,
        iommufd=[{"id": "iommufd1"}],
        vfio=[{"id": "dev1", "host": "0000:01:00.0", "iommufd": "iommufd1"}],
        disk=[{"id": "disk1", "path": "top.qcow2", "format": "qcow2"}],
        net=[{"id": "net1", "forwards": ["tcp:127.0.0.1:2222:22"]}],
    )


ATTACH_STEPS = [
    "getfd vmrun-object-iommufd1",
    "object-add iommufd1",
    "getfd vmrun-device-dev1",
    "device_add dev1",
    "add-fd disk1-b1",
    "blockdev-add disk1-b1-file",
    "blockdev-add disk1-b1-fmt",
    "add-fd disk1",
    "blockdev-add disk1-file",
    "blockdev-add disk1-fmt",
    "device_add disk1",
    "netdev_add net1",
    "device_add net1",
]


def test_attach_of_each_kind_then_detach_leaves_qemu_as_it_was(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    vm = fake_vm("t")
    frag = everything(world)
    start = time.monotonic()
    proc = vmrun("attach", "t", str(frag), "--host-root", str(host_tree))
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert vm.changes() == ATTACH_STEPS
    model = vm.model()
    # QEMU got the files vmrun opened: /dev/iommu and the cdev of the host tree, each layer.
    assert model["objects"]["iommufd1"]["fd"] == str(host_tree / "dev" / "iommu")
    assert model["devices"]["dev1"]["fd"] == str(host_tree / "dev" / "vfio" / "devices" / "vfio0")
    assert sorted(s["target"] for s in model["fdsets"].values()) == [
        str(world / "base.qcow2"),
        str(world / "top.qcow2"),
    ]
    assert {d: model["devices"][d]["bus"] for d in ("dev1", "disk1", "net1")} == {
        "dev1": "hotplug0",
        "disk1": "hotplug1",
        "net1": "hotplug2",
    }
    assert model["netdevs"]["net1"]["hostfwd"] == [{"str": "tcp:127.0.0.1:2222-:22"}]
    assert model["fds"] == {}, "every named fd was taken by what it was for"
    assert "attached vfio dev1: vfio-pci (host=0000:01:00.0, iommufd1) on hotplug0" in proc.stdout
    assert "a restart of the VM brings none of this back" in proc.stdout
    ps = json.loads(vmrun("ps", "--json").stdout)
    assert [d for d in ps[0]["devices"] if "attached" in d] == [
        "vfio-pci dev1 (host=0000:01:00.0, iommufd1, attached)",
        f"virtio-blk-pci disk1 ({world / 'top.qcow2'}, qcow2, attached)",
        "virtio-net-pci net1 (user, netdev, attached)",
    ]
    print(f"attach of 4 entries (fake QEMU): {took:.2f} s")

    before = len(vm.changes())
    for ident in ("dev1", "disk1", "net1"):
        proc = vmrun("detach", "t", ident)
        assert proc.returncode == 0, proc.stderr
    assert vm.changes()[before:] == [
        "device_del dev1",
        "object-del iommufd1",  # its last device went
        "device_del disk1",
        "blockdev-del disk1-fmt",
        "blockdev-del disk1-file",
        "remove-fd 1",
        "blockdev-del disk1-b1-fmt",
        "blockdev-del disk1-b1-file",
        "remove-fd 0",
        "device_del net1",
        "netdev_del net1",
    ]
    assert vm.model() == EMPTY
    assert vm.attached() == []


@pytest.mark.parametrize("failing", [s for s in ATTACH_STEPS if not s.startswith("getfd")] + ATTACH_STEPS[:1])
def test_a_failed_step_undoes_every_step_before_it(
    failing: str, world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    vm = fake_vm("t", env={"VMRUN_FAKE_QMP_FAIL": failing.replace(" ", ":")})
    proc = vmrun("attach", "t", str(everything(world)), "--host-root", str(host_tree))
    assert proc.returncode == 1
    assert f"attach to VM t failed at {failing}: QEMU: injected failure of {failing}" in proc.stderr
    assert "the VM is as it was before the attach" in proc.stderr
    assert "Traceback" not in proc.stderr
    done = ATTACH_STEPS[: ATTACH_STEPS.index(failing)]
    changes = vm.changes()
    assert changes[: len(done) + 1] == [*done, f"{failing} FAILED"]
    undone = [c.split(" ", 1)[0] for c in changes[len(done) + 1 :]]
    expected = {
        "getfd": "closefd",
        "object-add": "object-del",
        "device_add": "device_del",
        "add-fd": "remove-fd",
        "blockdev-add": "blockdev-del",
        "netdev_add": "netdev_del",
    }
    # A getfd whose fd the next step took has nothing left to close: QEMU releases that fd
    # when the object or device that took it goes.
    taken = {i for i, c in enumerate(done) if c.startswith("getfd") and i + 1 < len(done)}
    assert undone == [expected[c.split(" ", 1)[0]] for i, c in reversed(list(enumerate(done))) if i not in taken]
    assert vm.model() == EMPTY
    assert vm.attached() == []


def test_bad_fragments_exit_2_naming_the_fragment_and_nothing_reaches_qemu(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm]
) -> None:
    image = world / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    vm = fake_vm("t", sections={"disk": [{"id": "boot", "path": str(image)}]})
    cases: dict[str, dict[str, Any]] = {
        "vfio[0].hots: unknown key (did you mean 'host'?)": {"vfio": [{"id": "d", "hots": "01:00.0"}]},
        'disk[0].id: "boot" is already the id of disk boot of the running VM': {
            "disk": [{"id": "boot", "path": str(image)}]
        },
        'vfio[0].iommufd: no [[iommufd]] has id "nope"': {
            "vfio": [{"id": "d", "host": "0000:01:00.0", "iommufd": "nope"}]
        },
        "vm: a fragment adds devices to a running VM; [vm] is the VM's own": {"vm": {"name": "x"}},
        "adds nothing": {},
        "disk[0].interface: the VM has no SCSI controller (none of its disks is scsi)": {
            "disk": [{"id": "s", "path": str(image), "interface": "scsi"}]
        },
        'net[0].id: "hotplug0" is the id of a hot-plug root port': {"net": [{"id": "hotplug0"}]},
    }
    for expected, sections in cases.items():
        path = fragment(world, **sections)
        proc = vmrun("attach", "t", str(path))
        assert proc.returncode == 2, (expected, proc.stderr)
        assert f"{path}: {expected}" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert vm.changes() == []


@pytest.mark.skipif(not is_root(), reason="needs root to run QEMU as nobody")
def test_files_are_opened_with_the_vm_users_rights(world: pathlib.Path, fake_vm: Callable[..., FakeVm]) -> None:
    secret = world / "root-only.raw"
    secret.write_bytes(b"\0" * 4096)
    secret.chmod(0o600)
    (world / "link.raw").symlink_to(secret)
    vm = fake_vm("t", user="nobody")
    for name in ("root-only.raw", "link.raw"):
        proc = vmrun("attach", "t", str(fragment(world, disk=[{"id": "d", "path": name}])))
        assert proc.returncode == 2, proc.stderr
        assert f"disk[0].path: {world / name}: nobody may not open it" in proc.stderr
    # What the header of an image names is opened as nobody too.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "root-only.raw", "-F", "raw", "top.qcow2"],
        cwd=world,
        check=True,
    )
    (world / "top.qcow2").chmod(0o666)
    proc = vmrun("attach", "t", str(fragment(world, disk=[{"id": "d", "path": "top.qcow2", "format": "qcow2"}])))
    assert proc.returncode == 2, proc.stderr
    assert "disk[0].path" in proc.stderr and "root-only.raw" in proc.stderr
    assert vm.changes() == []


def test_ids_qemu_already_has_are_refused(world: pathlib.Path, fake_vm: Callable[..., FakeVm]) -> None:
    vm = fake_vm("t")
    from vmrun.control import qmp, state

    # A device added behind vmrun's back (vmrun qmp device_add) is not in any record.
    qmp.execute(state.running("t").qmp_socket, "device_add", {"driver": "virtio-rng-pci", "id": "net1"})
    proc = vmrun("attach", "t", str(fragment(world, net=[{"id": "net1"}])))
    assert proc.returncode == 2
    assert f"{world / FRAGMENT}: net[0].id: QEMU of VM t already has a device net1" in proc.stderr
    assert vm.changes() == ["device_add net1"]


def test_no_free_hotplug_slot_is_refused_before_anything_changes(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm]
) -> None:
    vm = fake_vm("t", hotplug_slots=1)
    proc = vmrun("attach", "t", str(fragment(world, net=[{"id": "n1"}, {"id": "n2"}])))
    assert proc.returncode == 1
    assert "VM t has 1 free hot-plug slot, and the fragment needs 2" in proc.stderr
    assert "raise [vm] hotplug_slots" in proc.stderr
    assert vm.changes() == []


def without_cap_sys_resource(*args: str) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is missing"
    return [setpriv, "--inh-caps=-sys_resource", "--bounding-set=-sys_resource", *args]


@pytest.mark.skipif(not is_root(), reason="vmrun as root, without CAP_SYS_RESOURCE")
def test_memlock_that_cannot_be_raised_is_refused_with_the_figures(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    vm = fake_vm("t", memlock="auto")
    frag = fragment(
        world,
        iommufd=[{"id": "iommufd1"}],
        vfio=[{"id": "dev1", "host": "0000:01:00.0", "iommufd": "iommufd1"}],
    )
    limits = pathlib.Path(f"/proc/{vm.pid}/limits").read_text()
    proc = subprocess.run(
        without_cap_sys_resource(
            sys.executable, "-m", "vmrun.cli", "attach", "t", str(frag), "--host-root", str(host_tree)
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "VM t needs RLIMIT_MEMLOCK 128 MiB with the fragment (1 DMA address space (iommufd iommufd1) x 64 MiB RAM"
        " + 64 MiB margin); its QEMU has 8 MiB, and vmrun may not raise it" in proc.stderr
    )
    assert "nothing was changed" in proc.stderr
    assert vm.changes() == []
    assert pathlib.Path(f"/proc/{vm.pid}/limits").read_text() == limits


def test_caller_fds_in_a_fragment_are_passed_on(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    vm = fake_vm("t")
    frag = fragment(
        world,
        iommufd=[{"id": "iommufd1", "fd": 7}],
        vfio=[{"id": "dev1", "fd": 8, "iommufd": "iommufd1"}],
    )
    proc = vmrun("attach", "t", str(frag), "--host-root", str(host_tree))
    assert proc.returncode == 1
    assert "fd 7 (iommufd iommufd1 (from the caller)) is not open in vmrun's process" in proc.stderr
    assert "vmrun attach NAME FRAGMENT 7<>/dev/iommu" in proc.stderr
    assert vm.changes() == []
    # The caller opens them at 7 and 8 (its shell's redirections), as the README shows.
    proc = subprocess.run(
        [
            "sh",
            "-c",
            'exec "$0" -m vmrun.cli attach t "$1" --host-root "$2" 7<>"$2/dev/iommu" 8<>"$2/dev/vfio/devices/vfio1"',
            sys.executable,
            str(frag),
            str(host_tree),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    model = vm.model()
    assert model["objects"]["iommufd1"]["fd"] == str(host_tree / "dev" / "iommu")
    assert model["devices"]["dev1"]["fd"] == str(host_tree / "dev" / "vfio" / "devices" / "vfio1")


def test_detach_of_a_device_the_guest_keeps(world: pathlib.Path, fake_vm: Callable[..., FakeVm]) -> None:
    vm = fake_vm("t", env={"VMRUN_FAKE_QMP_STUCK": "1"})
    assert vmrun("attach", "t", str(fragment(world, net=[{"id": "net1"}]))).returncode == 0
    for _ in range(2):  # the second time, QEMU says the unplug is under way: vmrun waits again
        start = time.monotonic()
        proc = vmrun("detach", "t", "net1", "--timeout", "1")
        assert proc.returncode == 1
        assert "the guest of VM t did not release net1 within 1 s; the VM keeps running with the device" in proc.stderr
        assert time.monotonic() - start < 10
    assert "net1" in vm.model()["devices"] and "net1" in vm.model()["netdevs"]
    assert [a["id"] for a in vm.attached()] == ["net1"]


def test_scsi_disks_go_on_the_vms_scsi_controller(world: pathlib.Path, fake_vm: Callable[..., FakeVm]) -> None:
    """A VM launched with a scsi disk has the controller: more scsi disks are hot-plugged on its
    bus (no hot-plug slot taken), beside a disk on a slot; each comes and goes alone."""
    for name in ("boot.raw", "s1.raw", "s2.raw", "v.raw"):
        (world / name).write_bytes(b"\0" * 4096)
        (world / name).chmod(0o666)
    vm = fake_vm("t", sections={"disk": [{"id": "boot", "path": str(world / "boot.raw"), "interface": "scsi"}]})
    frag = fragment(
        world,
        disk=[
            {"id": "s1", "path": "s1.raw", "interface": "scsi"},
            {"id": "v1", "path": "v.raw"},
            {"id": "s2", "path": "s2.raw", "interface": "scsi", "serial": "S2"},
        ],
    )
    proc = vmrun("attach", "t", str(frag))
    assert proc.returncode == 0, proc.stderr
    devices = vm.model()["devices"]
    assert {d: (devices[d]["driver"], devices[d]["bus"]) for d in devices} == {
        "s1": ("scsi-hd", "scsi0.0"),
        "v1": ("virtio-blk-pci", "hotplug0"),
        "s2": ("scsi-hd", "scsi0.0"),
    }
    assert devices["s2"]["serial"] == "S2"
    assert "attached disk s1: scsi-hd" in proc.stdout and "on scsi0.0" in proc.stdout
    assert "attached disk v1: virtio-blk-pci" in proc.stdout and "on hotplug0" in proc.stdout
    for ident in ("s1", "v1", "s2"):
        assert vmrun("detach", "t", ident).returncode == 0
    assert vm.model() == EMPTY and vm.attached() == []


def test_detach_of_an_object_a_device_still_uses_changes_nothing(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    vm = fake_vm("t")
    frag = fragment(
        world,
        iommufd=[{"id": "iommufd1"}],
        vfio=[{"id": "dev1", "host": "0000:01:00.0", "iommufd": "iommufd1"}],
    )
    assert vmrun("attach", "t", str(frag), "--host-root", str(host_tree)).returncode == 0
    before = vm.changes()
    proc = vmrun("detach", "t", "iommufd1")
    assert proc.returncode == 2, proc.stderr
    assert "iommufd object iommufd1 of VM t is in use by dev1" in proc.stderr
    assert "hint: detach dev1: an object vmrun attached goes with its last device" in proc.stderr
    assert vm.changes() == before and "iommufd1" in vm.model()["objects"]
    assert [a["id"] for a in vm.attached()] == ["iommufd1", "dev1"]
    proc = vmrun("detach", "t", "dev1")
    assert proc.returncode == 0, proc.stderr
    assert vm.changes()[len(before) :] == ["device_del dev1", "object-del iommufd1"]
    assert vm.model() == EMPTY and vm.attached() == []


def test_detach_of_what_vmrun_did_not_attach(world: pathlib.Path, fake_vm: Callable[..., FakeVm]) -> None:
    vm = fake_vm("t", sections={"net": [{"id": "net0"}]})
    proc = vmrun("detach", "t", "net0")
    assert proc.returncode == 2
    assert "net0 is part of VM t's config" in proc.stderr
    proc = vmrun("detach", "t", "nope")
    assert proc.returncode == 2
    assert "VM t has no attached device or object nope\n  hint: attached: nothing" in proc.stderr
    proc = vmrun("detach", "nothere", "x")
    assert proc.returncode == 1 and "VM nothere is not running" in proc.stderr
    assert vm.changes() == []


DEMO = REPO / "build" / "demo"


def console_lines(sock: socket.socket, seen: list[str], until: Callable[[str], bool], timeout: float) -> str:
    """Read the guest's console until a line satisfies `until`; that line."""
    deadline = time.monotonic() + timeout
    buffer = ""
    while time.monotonic() < deadline:
        for line in seen:
            if until(line):
                seen.remove(line)
                return line
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            break
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        seen += [line.strip() for line in lines]
    raise AssertionError(f"no such console line within {timeout:g} s; last lines: {seen[-5:]}")


@pytest.mark.qemu
def test_scsi_disk_comes_and_goes_on_real_qemus_controller(world: pathlib.Path) -> None:
    """Real QEMU takes the QMP steps for a scsi disk on the controller of the config's scsi
    disk, and lets it go again (virtio-scsi unplugs without the guest's consent)."""
    for name in ("boot.raw", "data.raw"):
        (world / name).write_bytes(b"\0" * (1 << 20))
        (world / name).chmod(0o666)
    cfg = world / "s.toml"
    cfg.write_text(
        tomli_w.dumps(
            {
                "vm": {
                    "name": "s",
                    "memory": "128M",
                    "accel": "tcg",
                    "console": "none",
                    "memlock": "off",
                    **({"user": "nobody"} if is_root() else {}),
                },
                "disk": [{"id": "boot", "path": str(world / "boot.raw"), "interface": "scsi"}],
            }
        )
    )
    run = Running(cfg, "s", "--paused")
    try:
        run.wait_running()
        proc = vmrun(
            "attach", "s", str(fragment(world, disk=[{"id": "data", "path": "data.raw", "interface": "scsi"}]))
        )
        assert proc.returncode == 0, proc.stderr
        assert "attached disk data: scsi-hd" in proc.stdout and "on scsi0.0" in proc.stdout

        def peripherals() -> set[str]:
            listed = json.loads(vmrun("qmp", "s", "qom-list", '{"path": "/machine/peripheral"}').stdout)
            return {p["name"] for p in listed}

        def nodes() -> set[str]:
            return {n["node-name"] for n in json.loads(vmrun("qmp", "s", "query-named-block-nodes").stdout)}

        assert {"scsi0", "boot", "data"} <= peripherals() and {"data-file", "data-fmt"} <= nodes()
        proc = vmrun("detach", "s", "data", "--timeout", "10")
        assert proc.returncode == 0, proc.stderr
        assert "data" not in peripherals() and not {"data-file", "data-fmt"} & nodes()
        assert "boot" in peripherals()
    finally:
        run.end()


@pytest.mark.qemu
def test_disk_and_nic_come_and_go_in_a_booted_guest(tmp_path: pathlib.Path, world: pathlib.Path) -> None:
    """Real QEMU, the demo guest watching its block devices and PCI functions."""
    if not (DEMO / "vmlinuz").exists():
        pytest.fail("build/demo is missing: scripts/install builds the demo guest")
    image = world / "scratch.raw"
    image.write_bytes(b"\0" * (8 << 20))
    image.chmod(0o666)
    cfg = world / "g.toml"
    cfg.write_text(
        tomli_w.dumps(
            {
                "vm": {
                    "name": "g",
                    "memory": "256M",
                    "accel": "tcg",
                    "console": "socket",
                    "memlock": "off",
                    **({"user": "nobody"} if is_root() else {}),
                    "kernel": str(DEMO / "vmlinuz"),
                    "initrd": str(DEMO / "initrd"),
                    "append": "console=ttyS0 quiet vmrun-demo=watch",
                }
            }
        )
    )
    # The demo's kernel and initrd live in the checkout, which nobody may not reach.
    for name in ("vmlinuz", "initrd"):
        shutil.copy(DEMO / name, world / name)
        (world / name).chmod(0o644)
    cfg.write_text(cfg.read_text().replace(str(DEMO), str(world)))
    frag = fragment(
        world,
        disk=[{"id": "scratch", "path": str(image), "interface": "nvme"}],
        net=[{"id": "nic1"}],
    )
    run = Running(cfg, "g")
    try:
        run.wait_running()
        from vmrun.control import state

        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.connect(os.path.join(state.running("g").state_dir, "console.sock"))
        seen: list[str] = []
        console_lines(console, seen, lambda line: line.startswith("vmrun-demo: block:"), 120)
        start = time.monotonic()
        proc = vmrun("attach", "g", str(frag))
        attach_s = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr
        # virtio-net on a PCIe port is a modern-only device: 1af4:1041.
        line = console_lines(console, seen, lambda line: "nvme0n1" in line and "0x1af4:0x1041" in line, 60)
        seen_s = time.monotonic() - start
        start = time.monotonic()
        for ident in ("scratch", "nic1"):
            proc = vmrun("detach", "g", ident, "--timeout", "60")
            assert proc.returncode == 0, proc.stderr
        detach_s = time.monotonic() - start
        console_lines(console, seen, lambda line: "block:" in line and "nvme" not in line and "0x1041" not in line, 60)
        print(
            f"demo guest: attach {attach_s:.2f} s (guest saw both in {seen_s:.2f} s), detach of both {detach_s:.2f} s; "
            f"guest line after attach: {line}"
        )
        console.close()
    finally:
        run.end()


@pytest.mark.qemu
@pytest.mark.skipif(not is_root(), reason="needs root to make a tap and run QEMU as nobody")
def test_tap_attached_to_a_deprivileged_qemu(world: pathlib.Path, tap: str) -> None:
    """Real QEMU as nobody gets a nic on an existing tap: vmrun opened /dev/net/tun."""
    cfg = world / "n.toml"
    cfg.write_text(
        tomli_w.dumps({"vm": {"name": "n", "memory": "64M", "accel": "tcg", "console": "none", "user": "nobody"}})
    )
    run = Running(cfg, "n", "--paused")
    try:
        run.wait_running()
        carrier = pathlib.Path("/sys/class/net") / tap / "carrier"
        assert carrier.read_text().strip() == "0"
        proc = vmrun("attach", "n", str(fragment(world, net=[{"id": "net1", "type": "tap", "ifname": tap}])))
        assert proc.returncode == 0, proc.stderr
        assert "attached net net1: virtio-net-pci (tap " in proc.stdout
        assert carrier.read_text().strip() == "1", "QEMU is attached to the tap through vmrun's fd"
        fds = {os.readlink(f"/proc/{run.pid}/fd/{n}") for n in os.listdir(f"/proc/{run.pid}/fd")}
        assert "/dev/net/tun" in fds
    finally:
        run.end()


LOOT = {"disk": [{"id": "loot", "path": "/etc/shadow", "trusted": True, "readonly": True}]}


@pytest.mark.parametrize("how", ["another user's", "writable by all", "another user's link"])
def test_a_fragment_root_may_not_trust_is_refused_and_nothing_reaches_qemu(
    how: str, world: pathlib.Path, fake_vm: Callable[..., FakeVm], local_users: LocalUsers
) -> None:
    """The report's first hole: a fragment of another user, or one anyone may write, that
    names a root-only file as a trusted disk. It must steer root no more than a drop-in."""
    vm = fake_vm("t")
    mallory = local_users.uid(local_users.mallory)
    frag = fragment(world, **LOOT)
    if how == "another user's":
        os.chown(frag, mallory, mallory)
        expected = f"{frag}: is owned by uid {mallory} ({local_users.mallory}), not by root"
    elif how == "writable by all":
        frag.chmod(0o666)
        expected = f"{frag}: is writable by every user"
    else:
        planted = world / "planted.toml"
        planted.symlink_to(frag)
        os.chown(planted, mallory, mallory, follow_symlinks=False)
        frag = planted
        expected = f"{planted}: {planted} is a symlink owned by uid {mallory}"
    proc = vmrun("attach", "t", str(frag))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr
    assert vm.changes() == []


def test_a_fragment_with_its_own_iommufd_object_attaches_beside_the_vms(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    """The report's traceback: a VM with an iommufd object of its own, and a fragment that
    brings a second address space. It attaches, and detaches, and so does it again."""
    vm = fake_vm(
        "t",
        sections={
            "iommufd": [{"id": "io0"}],
            "vfio": [{"id": "dev0", "host": "0000:02:00.0", "iommufd": "io0"}],
        },
        host_root=host_tree,
    )
    frag = fragment(world, iommufd=[{"id": "io1"}], vfio=[{"id": "dev1", "host": "0000:01:00.0", "iommufd": "io1"}])
    for _ in range(2):
        proc = vmrun("attach", "t", str(frag), "--host-root", str(host_tree))
        assert proc.returncode == 0, proc.stderr
        assert "attached iommufd io1: iommufd (/dev/iommu, object)" in proc.stdout
        assert [(a["section"], a["id"]) for a in vm.attached()] == [("iommufd", "io1"), ("vfio", "dev1")]
        assert vm.model()["devices"]["dev1"]["iommufd"] == "io1"
        proc = vmrun("detach", "t", "dev1")
        assert proc.returncode == 0, proc.stderr
        assert "detached iommufd io1" in proc.stdout
        assert vm.attached() == []


class Injected(RuntimeError):
    pass


def attach_in_process(name: str, frag: pathlib.Path, host_root: pathlib.Path) -> list[str]:
    from vmrun.control import hotplug
    from vmrun.launch import fd_open

    said: list[str] = []
    hotplug.attach(name, str(frag), str(host_root), said.append, fd_open.open_fds())
    return said


@pytest.mark.parametrize("after", [*ATTACH_STEPS, "record", "state.json"])
def test_any_exception_between_steps_undoes_the_attach(
    after: str,
    world: pathlib.Path,
    fake_vm: Callable[..., FakeVm],
    host_tree: pathlib.Path,
) -> None:
    """Not QEMU refusing, but vmrun itself failing between two steps (a bug, a full disk, a
    signal): everything done is undone, and the error says so, without a traceback."""
    from vmrun.base.errors import VmError
    from vmrun.control import hotplug, qmp

    vm = fake_vm("t")
    frag = everything(world)
    execute = qmp.Monitor.execute
    state = {"armed": True}

    def failing_execute(self: qmp.Monitor, command: str, arguments: Any = None, timeout: float = 30.0) -> Any:
        answer = execute(self, command, arguments, timeout)
        a = arguments or {}
        ident = next((a[k] for k in ("id", "node-name", "fdname", "fdset-id", "opaque") if k in a), None)
        if state["armed"] and f"{command} {ident}" == after:
            state["armed"] = False
            raise Injected(f"after {after}")
        return answer

    with pytest.MonkeyPatch.context() as mp, pytest.raises(VmError) as e:
        mp.setattr(qmp.Monitor, "execute", failing_execute)
        if after == "record":
            mp.setattr(hotplug.Attacher, "record", lambda self, part: (_ for _ in ()).throw(Injected("record")))
        if after == "state.json":
            mp.setattr(hotplug, "add_records", lambda vm, new: (_ for _ in ()).throw(OSError(28, "No space left")))
        attach_in_process("t", frag, host_tree)
    message = str(e.value)
    if after in ATTACH_STEPS:
        assert f"attach to VM t failed after {after}: Injected: after {after}" in message
    assert "the VM is as it was before the attach" in message, message
    assert vm.model() == EMPTY
    assert vm.attached() == []
    said = attach_in_process("t", frag, host_tree)  # and the same attach works afterwards
    assert any(line.startswith("attached to VM t") for line in said)


def test_the_memlock_limit_goes_only_to_the_proven_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """prlimit takes a pid: the process behind it is proven the VM's QEMU (pidfd alive, the
    recorded start time) before the call, so a pid that another process has by then is
    never given the limit."""
    import resource

    from vmrun.base.errors import VmError
    from vmrun.control import state
    from vmrun.control.hotplug import Memlock

    calls: list[int] = []
    real = resource.prlimit

    def spy(pid: int, which: int, limits: tuple[int, int] | None = None) -> tuple[int, int]:
        if limits is not None:
            calls.append(pid)
        return real(pid, which) if limits is None else real(pid, which, limits)

    monkeypatch.setattr(resource, "prlimit", spy)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        ticks = state.start_ticks(proc.pid)
        identity = state.Identity(proc.pid, ticks, "/bin/sleep", (), (0, 0), True)
        pidfd = os.pidfd_open(proc.pid)
        memlock = Memlock(identity, pidfd)
        soft, hard = memlock.before
        memlock.set((soft, hard))  # the proven process: set
        assert calls == [proc.pid]
        # The record says another start time: the pid is someone else's now.
        impostor = Memlock.__new__(Memlock)
        impostor.identity, impostor.pid, impostor.pidfd = attrs.evolve(identity, start_ticks=ticks + 1), proc.pid, pidfd
        with pytest.raises(VmError, match="is no longer the VM's QEMU: its memlock limit was not touched"):
            impostor.set((soft, hard))
        proc.kill()
        proc.wait()
        with pytest.raises(VmError, match="exited during the attach"):
            memlock.set((soft, hard))
        assert calls == [proc.pid]
        os.close(pidfd)
    finally:
        proc.kill()
        proc.wait()


TERMINAL_TRICKS = "\x1b]0;pwned\x07\x1b[2K\x1b[1Ashutdown done\r\u202eevil\nfake line"


def test_what_qemu_says_reaches_the_terminal_as_data(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], host_tree: pathlib.Path
) -> None:
    """Whoever holds QEMU's QMP socket (its user can take it with pidfd_getfd) chooses the
    words vmrun prints: a run state, a refusal. They reach root's terminal escaped."""
    words = world / "words.json"
    words.write_text(json.dumps({"status": TERMINAL_TRICKS, "refusal": TERMINAL_TRICKS}))
    words.chmod(0o644)
    fake_vm("t", env={"VMRUN_FAKE_QMP_WORDS": str(words), "VMRUN_FAKE_QMP_FAIL": "netdev_add:net1"})
    status = vmrun("status", "t")
    assert status.returncode == 0, status.stderr
    shown = "\\x1b]0;pwned\\x07\\x1b[2K\\x1b[1Ashutdown done\\x0d\\u202eevil\\x0afake line"
    assert f"  state    {shown}\n" in status.stdout
    attach = vmrun("attach", "t", str(fragment(world, net=[{"id": "net1"}])))
    assert attach.returncode == 1
    assert f"failed at netdev_add net1: QEMU: {shown}" in attach.stderr
    for out in (status.stdout, status.stderr, attach.stdout, attach.stderr):
        assert not any(c in out for c in "\x1b\x07\r\u202e"), out
    assert json.loads(vmrun("status", "t", "--json").stdout)["status"]["status"] == TERMINAL_TRICKS


def test_a_device_whose_bars_do_not_fit_a_slot_is_refused(
    world: pathlib.Path, fake_vm: Callable[..., FakeVm], tmp_path: pathlib.Path
) -> None:
    """A hot-plug root port holds what it reserved at the VM's start (2 MiB of prefetchable
    window by the firmware's own measure): a GPU's 16 GiB BAR does not fit, and attach says
    so with the figures before anything changes; with hotplug_reserve it attaches."""
    from tests import fakehost

    gpu = fakehost.gpu("0000:0a:00.0", 10, 0, 16 * fakehost.GiB)
    root = fakehost.build(tmp_path / "host", fakehost.FakeHost(devices=(gpu,)))
    frag = fragment(world, iommufd=[{"id": "io1"}], vfio=[{"id": "gpu1", "host": "0a:00.0", "iommufd": "io1"}])
    vm = fake_vm("small", host_root=root)
    proc = vmrun("attach", "small", str(frag), "--host-root", str(root))
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{frag}: vfio[0]: host=0000:0a:00.0 does not fit a hot-plug slot of the VM: its 64-bit prefetchable BARs"
        " take 16.03G, a slot's window is 2M; its other BARs take 16M, a slot's memory window is 2M" in proc.stderr
    )
    assert 'set [vm] hotplug_reserve = "32G"' in proc.stderr
    assert vm.changes() == []
    big = fake_vm("big", host_root=root, hotplug_reserve="32G")
    proc = vmrun("attach", "big", str(frag), "--host-root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert big.model()["devices"]["gpu1"]["bus"] == "hotplug0"
