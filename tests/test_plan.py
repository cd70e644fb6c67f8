"""The plan against fake hosts: fd numbering, memlock, identity and every host problem."""

from __future__ import annotations

import json
import pathlib
import struct
import time
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
import tomli_w

from tests import fakehost
from tests.conftest import FAKE_CAPS, REPO, ROOT, UNPRIVILEGED, is_root, plan_for
from vmrun import cli
from vmrun.base.sizes import GiB
from vmrun.host import facts as host
from vmrun.host import qemu_caps
from vmrun.host.facts import Launcher
from vmrun.host.qemu_caps import QemuCaps
from vmrun.plan import render
from vmrun.plan.memlock import MARGIN
from vmrun.plan.planner import Plan

SHARED: dict[str, Any] = {
    "vm": {"name": "t", "memory": "1G", "user": "nobody"},
    "iommufd": [{"id": "iommufd0"}],
    "vfio": [
        {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0"},
        {"id": "dev1", "host": "0000:02:00.0", "iommufd": "iommufd0"},
    ],
}
LEGACY: dict[str, Any] = {
    "vm": {"name": "t", "memory": "1G", "user": "nobody"},
    "vfio": [{"id": "dev0", "host": "0000:01:00.0"}],
}


def make(tmp_path: pathlib.Path, data: Mapping[str, Any]) -> pathlib.Path:
    path = tmp_path / "vm.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def problems(p: Plan) -> list[str]:
    return [f"{x.path}: {x.message}" for x in p.problems]


def with_devices(data: Mapping[str, Any], *devices: dict[str, Any]) -> dict[str, Any]:
    return {**data, "vfio": list(devices)}


def test_shared_object_plan(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    p = plan_for(make(tmp_path, SHARED), standard_host)
    assert p.problems == ()
    assert "-object" in p.argv and "iommufd,id=iommufd0,fd=3" in p.argv
    assert "vfio-pci,id=dev0,fd=4,iommufd=iommufd0" in p.argv
    assert "vfio-pci,id=dev1,fd=5,iommufd=iommufd0" in p.argv
    assert [(f.fd, f.path) for f in p.fds] == [
        (3, "/dev/iommu"),
        (4, "/dev/vfio/devices/vfio0"),
        (5, "/dev/vfio/devices/vfio1"),
        (6, f"{p.state_dir}/lock"),
        (7, f"{p.state_dir}/qmp.sock"),
    ]
    assert "socket,id=vmrun-qmp,fd=7,server=on,wait=off" in p.argv
    assert p.memlock.limit == 1 * GiB + MARGIN
    assert p.run_as is not None and p.run_as.name == "nobody"


def test_json_has_the_documented_fields(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    data = render.to_json(plan_for(make(tmp_path, SHARED), standard_host))
    assert data["fds"][0] == {
        "fd": 3,
        "path": "/dev/iommu",
        "flags": "O_RDWR",
        "purpose": "iommufd iommufd0",
        "per_process_accounting": False,
        "kind": "device",
        "as_user": False,
    }
    assert data["env"] == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/nonexistent",
        "USER": "nobody",
        "LOGNAME": "nobody",
        "LANG": "C.UTF-8",
    }
    assert data["memlock_bytes"] == 1 * GiB + MARGIN
    assert data["run_as"]["user"] == "nobody"
    assert data["argv"][0] == "qemu-system-x86_64"


def test_cli_plan_json(
    tmp_path: pathlib.Path, standard_host: pathlib.Path, fake_qemu: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = {"name": "t", "memory": "1G", "memlock": "4M", "qemu": str(fake_qemu)}
    data = {**SHARED, "vm": vm}
    assert cli.main(["plan", str(make(tmp_path, data)), "--json", "--host-root", str(standard_host)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["argv"][0] == str(fake_qemu)
    assert [(f["fd"], f["kind"]) for f in out["fds"]] == [
        (3, "device"),
        (4, "device"),
        (5, "device"),
        (6, "lock"),
        (7, "qmp"),
    ]
    assert out["problems"] == []


def test_memlock_per_address_space(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    two = {
        "vm": {"name": "t", "memory": "2G"},
        "iommufd": [{"id": "a"}, {"id": "b"}],
        "vfio": [
            {"id": "d0", "host": "0000:01:00.0", "iommufd": "a"},
            {"id": "d1", "host": "0000:02:00.0", "iommufd": "b"},
            {"id": "d2", "host": "0000:03:00.0"},
        ],
    }
    p = plan_for(make(tmp_path, two), standard_host)
    assert p.memlock.limit == 3 * 2 * GiB + MARGIN
    assert "3 DMA address spaces" in p.memlock.derivation


def test_memlock_explicit_overrides(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    data = {**SHARED, "vm": {"name": "t", "memory": "1G", "memlock": "3G"}}
    assert plan_for(make(tmp_path, data), standard_host).memlock.limit == 3 * GiB


def test_no_devices_leaves_memlock_alone(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    p = plan_for(make(tmp_path, {"vm": {"name": "t", "memory": "1G"}}), standard_host)
    assert p.memlock.limit is None and [f.kind for f in p.fds] == ["lock", "qmp"]


def test_fd_numbers_skip_the_callers(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    data = {
        "vm": {"name": "t", "memory": "1G"},
        "iommufd": [{"id": "i0", "fd": 3}],
        "vfio": [
            {"id": "d0", "fd": 4, "iommufd": "i0"},
            {"id": "d1", "host": "0000:01:00.0", "iommufd": "i0"},
            {"id": "d2", "host": "0000:02:00.0", "iommufd": "i0"},
        ],
    }
    p = plan_for(make(tmp_path, data), standard_host)
    assert [(f.fd, f.path) for f in p.fds if f.kind != "lock" and f.kind != "qmp"] == [
        (3, None),
        (4, None),
        (5, "/dev/vfio/devices/vfio0"),
        (6, "/dev/vfio/devices/vfio1"),
    ]


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"host": "0000:09:00.0"}, "vfio[0].host: no PCI device 0000:09:00.0 on this host"),
        (
            {"sysfsdev": "/sys/bus/pci/devices/0000:09:00.0"},
            "vfio[0].sysfsdev: /sys/bus/pci/devices/0000:09:00.0 does not exist on this host",
        ),
        ({"host": "0000:04:00.0"}, "vfio[0]: host=0000:04:00.0 is bound to nvme, not vfio-pci"),
        (
            {"host": "0000:05:00.0"},
            "vfio[0]: IOMMU group 5 is not viable: 0000:05:00.1 (snd_hda_intel) bound to a host driver",
        ),
    ],
)
def test_device_problems(
    tmp_path: pathlib.Path, standard_host: pathlib.Path, device: dict[str, object], expected: str
) -> None:
    data = with_devices(SHARED, {"id": "dev0", "iommufd": "iommufd0", **device})
    assert problems(plan_for(make(tmp_path, data), standard_host)) == [expected]


def test_unbound_device(tmp_path: pathlib.Path) -> None:
    root = fakehost.build(
        tmp_path / "h",
        fakehost.FakeHost(devices=(fakehost.FakePci("0000:01:00.0", driver=None, cdev=None),)),
    )
    data = with_devices(SHARED, {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0"})
    assert problems(plan_for(make(tmp_path, data), root)) == [
        "vfio[0]: host=0000:01:00.0 is bound to no driver, not vfio-pci"
    ]


def test_no_cdev_and_no_dev_iommu(tmp_path: pathlib.Path) -> None:
    spec = fakehost.FakeHost(devices=(fakehost.FakePci("0000:01:00.0", cdev=None),), dev_iommu=False)
    root = fakehost.build(tmp_path / "h", spec)
    data = with_devices(SHARED, {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0"})
    p = plan_for(make(tmp_path, data), root)
    assert problems(p) == [
        "iommufd[0]: /dev/iommu does not exist: the kernel has no IOMMUFD",
        "vfio[0]: host=0000:01:00.0 has no VFIO device cdev (no vfio-dev/ in sysfs)",
    ]
    assert p.fds[1].path == "(VFIO cdev of host=0000:01:00.0)"


def test_legacy_needs_container(tmp_path: pathlib.Path) -> None:
    spec = fakehost.FakeHost(devices=(fakehost.FakePci("0000:01:00.0"),), vfio_container=False)
    root = fakehost.build(tmp_path / "h", spec)
    data = {"vm": {"name": "t", "memory": "1G"}, "vfio": [{"id": "dev0", "host": "0000:01:00.0"}]}
    assert problems(plan_for(make(tmp_path, data), root)) == [
        "vfio[0]: the legacy backend needs /dev/vfio/vfio, which does not exist"
    ]


def test_legacy_deprivileged_cannot_open_group(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    (msg,) = problems(plan_for(make(tmp_path, LEGACY), standard_host))
    assert msg.startswith("vfio[0]: QEMU runs as nobody and opens /dev/vfio/1 itself on the legacy backend")


def test_qemu_missing_and_too_old(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    path = make(tmp_path, SHARED)
    assert problems(plan_for(path, standard_host, caps=None)) == ["vm.qemu: QEMU binary 'qemu-system-x86_64' not found"]
    old = QemuCaps(
        path="/usr/bin/qemu-system-x86_64",
        version=(7, 2, 0),
        has_iommufd=False,
        device_props={"vfio-pci": ("host", "sysfsdev")},
    )
    assert problems(plan_for(path, standard_host, caps=old)) == [
        "iommufd: QEMU 7.2.0 at /usr/bin/qemu-system-x86_64 has no iommufd backend (QEMU >= 9.0 needed)",
    ]
    # A QEMU that has the backend but a device without the property is still caught.
    half = attrs.evolve(old, has_iommufd=True)
    assert problems(plan_for(path, standard_host, caps=half)) == [
        "vfio[0]: QEMU 7.2.0's vfio-pci has no 'iommufd' property",
        "vfio[0]: QEMU 7.2.0's vfio-pci has no 'fd' property",
        "vfio[1]: QEMU 7.2.0's vfio-pci has no 'iommufd' property",
        "vfio[1]: QEMU 7.2.0's vfio-pci has no 'fd' property",
    ]


def test_missing_device_type_and_property(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    data = with_devices(
        SHARED,
        {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0", "props": {"x-nope": 1}},
        {
            "id": "dev1",
            "driver": "vfio-ccw",
            "sysfsdev": "/sys/bus/mdev/devices/x",
            "iommufd": "iommufd0",
        },
    )
    assert problems(plan_for(make(tmp_path, data), standard_host)) == [
        "vfio[0].props.x-nope: vfio-pci of QEMU 10.0.2 has no property 'x-nope'",
        "vfio[1].driver: QEMU 10.0.2 at qemu-system-x86_64 has no device vfio-ccw",
        "vfio[1].sysfsdev: /sys/bus/mdev/devices/x does not exist on this host",
    ]


def test_identity_problems(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    data = {**SHARED, "vm": {"name": "t", "memory": "1G", "user": "no-such-user-here"}}
    assert problems(plan_for(make(tmp_path, data), standard_host)) == [
        "vm.user: no user 'no-such-user-here' on this host"
    ]
    p = plan_for(make(tmp_path, SHARED), standard_host, launcher=UNPRIVILEGED)
    assert "vm.user: vmrun runs as uid 1000 and cannot switch to nobody (uid 65534)" in problems(p)


def test_memlock_not_raisable(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    data = {**SHARED, "vm": {"name": "t", "memory": "1G"}}
    (p,) = plan_for(make(tmp_path, data), standard_host, launcher=UNPRIVILEGED).problems
    assert p.path == "vm.memlock"
    assert (
        p.message
        == "RLIMIT_MEMLOCK must be 1088 MiB but the hard limit is 8 MiB and vmrun lacks CAP_SYS_RESOURCE to raise it"
    )
    assert p.hint is not None and "LimitMEMLOCK=1088M" in p.hint
    high = attrs.evolve(UNPRIVILEGED, memlock_hard=2 * GiB)
    assert plan_for(make(tmp_path, data), standard_host, launcher=high).problems == ()


@pytest.mark.skipif(not is_root(), reason="mknod needs root")
def test_per_process_accounting_needs_char_node_and_cap(tmp_path: pathlib.Path) -> None:
    spec = fakehost.FakeHost(devices=(fakehost.FakePci("0000:01:00.0"),), char_nodes=True)
    root = fakehost.build(tmp_path / "h", spec)
    data = with_devices(SHARED, {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0"})
    path = make(tmp_path, data)
    assert plan_for(path, root).fds[0].per_process_accounting is True
    high = Launcher(
        uid=0,
        cap_sys_resource=False,
        cap_ipc_lock=False,
        memlock_soft=GiB * 4,
        memlock_hard=GiB * 4,
    )
    p = plan_for(path, root, launcher=high)
    assert p.fds[0].per_process_accounting is False
    assert any("charged to the user" in n.message for n in p.notes)


def test_every_example_config_validates_and_plans(standard_host: pathlib.Path) -> None:
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert len(configs) >= 4
    for path in configs:
        p = plan_for(path, standard_host, caps=FAKE_CAPS, launcher=ROOT)
        kernel_problems = [x for x in p.problems if x.path in ("vm.kernel", "vm.initrd")]
        # The demo's kernel is built by scripts/install; everything else must plan cleanly.
        assert list(p.problems) == kernel_problems, f"{path.name}: {problems(p)}"


def test_plan_of_64_devices_is_fast(tmp_path: pathlib.Path) -> None:
    devices = tuple(fakehost.FakePci(f"0000:{i + 1:02x}:00.0", group=i + 1, cdev=i) for i in range(64))
    root = fakehost.build(tmp_path / "h", fakehost.FakeHost(devices=devices))
    data = {
        "vm": {"name": "big", "memory": "64G", "user": "nobody"},
        "iommufd": [{"id": "iommufd0"}],
        "vfio": [{"id": f"d{i}", "host": d.address, "iommufd": "iommufd0"} for i, d in enumerate(devices)],
    }
    path = make(tmp_path, data)
    start = time.perf_counter()
    p = plan_for(path, root)
    elapsed = time.perf_counter() - start
    assert p.problems == () and len(p.fds) == 67 and p.fds[-3].fd == 67
    assert elapsed < 0.5, f"planning 64 devices took {elapsed:.3f} s"


def test_uefi_without_firmware_descriptors(tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "h", fakehost.FakeHost())
    data = {"vm": {"name": "t", "memory": "1G", "firmware": "uefi"}}
    assert problems(plan_for(make(tmp_path, data), root)) == ["vm.firmware: no UEFI firmware descriptor found"]


def test_uefi_skips_secure_boot_builds(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    p = plan_for(make(tmp_path, {"vm": {"name": "t", "memory": "1G", "firmware": "uefi"}}), standard_host)
    code, vars_ = (f for f in p.fds if f.kind in ("file", "data"))
    assert (code.path, code.flags, code.kind, code.as_user) == (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "O_RDONLY",
        "file",
        True,
    )
    # The default store is vmrun's own file, kept in its data directory.
    assert vars_.kind == "data"
    assert vars_.template == "/usr/share/OVMF/OVMF_VARS_4M.fd" and vars_.path is not None
    assert vars_.path.endswith("/t/OVMF_VARS.fd") and vars_.flags == "O_RDWR"


def test_disk_format_must_match_the_image(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    qcow2 = REPO / "tests" / "golden" / "images" / "overlay.qcow2"
    raw = REPO / "tests" / "golden" / "images" / "data.raw"
    data = {
        "vm": {"name": "t", "memory": "1G"},
        "disk": [{"id": "a", "path": str(qcow2)}, {"id": "b", "path": str(raw), "format": "qcow2"}],
    }
    assert problems(plan_for(make(tmp_path, data), standard_host)) == [
        f"disk[0].format: {qcow2} is qcow2, not raw",
        f"disk[1].format: {raw} is raw, not qcow2",
    ]


def test_tap_needs_the_interface_and_tun(tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "h", fakehost.FakeHost())
    data = {"vm": {"name": "t", "memory": "1G"}, "net": [{"id": "n0", "type": "tap", "ifname": "tap7"}]}
    assert problems(plan_for(make(tmp_path, data), root)) == [
        "net[0]: /dev/net/tun does not exist",
        "net[0].ifname: no network interface tap7 on this host",
    ]


def qcow2_header(path: pathlib.Path, backing: str | None) -> None:
    name = (backing or "").encode()
    header = (b"QFI\xfb" + struct.pack(">IQI", 3, 104 if backing else 0, len(name))).ljust(104, b"\0")
    path.write_bytes(header + name)


def test_backing_chain_problems(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    qcow2_header(tmp_path / "top.qcow2", "gone.qcow2")
    qcow2_header(tmp_path / "a.qcow2", "b.qcow2")
    qcow2_header(tmp_path / "b.qcow2", "a.qcow2")
    data = {
        "vm": {"name": "t", "memory": "1G"},
        "disk": [
            {"id": "d0", "path": str(tmp_path / "top.qcow2"), "format": "qcow2"},
            {"id": "d1", "path": str(tmp_path / "a.qcow2"), "format": "qcow2"},
        ],
    }
    assert problems(plan_for(make(tmp_path, data), standard_host)) == [
        f"disk[0].path: {tmp_path}/top.qcow2: backing file {tmp_path}/gone.qcow2: does not exist",
        f"disk[1].path: {tmp_path}/a.qcow2: the backing chain loops at {tmp_path}/a.qcow2",
    ]


def test_sandbox_needs_a_qemu_and_kernel_that_can(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    no_seccomp = attrs.evolve(FAKE_CAPS, has_sandbox=False)
    cfg = make(tmp_path, {"vm": {"name": "t", "memory": "1G"}})
    p = plan_for(cfg, standard_host, caps=no_seccomp)
    assert problems(p) == ["vm.sandbox: QEMU 10.0.2 at qemu-system-x86_64 cannot use its seccomp sandbox here"]
    assert "a kernel with SECCOMP_FILTER; or set sandbox = false" in (p.problems[0].hint or "")
    off = plan_for(
        make(tmp_path, {"vm": {"name": "t", "memory": "1G", "sandbox": False}}), standard_host, caps=no_seccomp
    )
    assert problems(off) == [] and "-sandbox" not in off.argv
    assert "vm.sandbox: QEMU runs without its seccomp sandbox" in [n.render().split(" (")[0] for n in off.notes]
    on = plan_for(make(tmp_path, {"vm": {"name": "t", "memory": "1G"}}), standard_host)
    assert (
        on.argv[on.argv.index("-sandbox") + 1]
        == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )


def test_real_qemu_probe_finds_the_sandbox() -> None:
    caps = qemu_caps.probe("qemu-system-x86_64", as_user=host.lookup_user("nobody"))
    assert caps is not None and caps.has_iommufd and caps.has_sandbox


def test_an_intel_viommu_is_no_wider_than_the_hosts_iommu(tmp_path: pathlib.Path) -> None:
    """QEMU refuses a passed device behind an intel-iommu wider than the host's ("aw-bits 48 >
    host aw-bits 39"): on a 39-bit VT-d the plan gives the vIOMMU 39 bits; on a 48-bit one
    QEMU's default stays; below 39 bits there is no width QEMU takes."""
    from tests import fakehost

    cfg = tmp_path / "vm.toml"
    cfg.write_text('[vm]\nname = "v"\nmemory = "1G"\nviommu = "intel"\n[[vfio]]\nid = "d"\nhost = "06:00.0"\n')
    for width, expected in ((39, "aw-bits=39"), (48, None), (36, None)):
        root = fakehost.build(
            tmp_path / f"host{width}",
            fakehost.FakeHost(devices=fakehost.GPU_DEVICES[-1:], iommus=(("dmar0", width),), kernel="6.12.48"),
        )
        p = plan_for(cfg, root)
        viommu = next(a for a in p.argv if a.startswith("intel-iommu"))
        assert (expected in viommu) if expected else "aw-bits" not in viommu, viommu
        refused = [x.message for x in p.problems if x.path == "vm.viommu"]
        assert bool(refused) == (width == 36), refused


def test_bars_the_kernel_maps_stay_within_a_narrow_iommu(tmp_path: pathlib.Path) -> None:
    """Firmware puts the 64-bit window at the top of the guest's addresses (QEMU's 40 bits by
    default under TCG). The legacy container maps BARs into the IOMMU for peer-to-peer DMA: on
    a 39-bit VT-d the guest gets 39 bits, so the BAR stays where the IOMMU reaches. iommufd on
    Linux 6.12 maps no BARs: QEMU's default stays."""
    from tests import fakehost

    dev = fakehost.FakePci("0000:07:00.0", group=7, cdev=0, bars=(fakehost.FakeBar(2, fakehost.GiB),))
    root = fakehost.build(
        tmp_path / "host", fakehost.FakeHost(devices=(dev,), iommus=(("dmar0", 39),), kernel="6.12.48")
    )
    cfg = tmp_path / "vm.toml"
    base = '[vm]\nname = "b"\nmemory = "256M"\naccel = "tcg"\n'
    cfg.write_text(base + '[[vfio]]\nid = "bar"\nhost = "07:00.0"\n')
    legacy = plan_for(cfg, root)
    assert legacy.address_space is not None and legacy.address_space.phys_bits == 39
    assert ("-cpu", "qemu64,phys-bits=39") in legacy.options
    cfg.write_text(base + '[[iommufd]]\nid = "io"\n[[vfio]]\nid = "bar"\nhost = "07:00.0"\niommufd = "io"\n')
    modern = plan_for(cfg, root)
    assert modern.address_space is not None and not modern.address_space.set_phys_bits
    assert not [o for o in modern.options if o[0] == "-cpu"]
