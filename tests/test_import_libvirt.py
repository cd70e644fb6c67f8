"""`vmrun import` of command lines as libvirt writes them: QEMU's JSON option syntax, each
device on a root port of its own, its monitor, master key and RAM object, fds for taps and
cdevs. Each case is imported, validated and planned on a fake host that has its devices,
and the plan must pass what the source passed: VFIO devices, iommufd objects, disks, nics,
memory and CPUs. (Our own corpus, in libvirt's documented forms; tests/libvirt/.)"""

from __future__ import annotations

import pathlib
import tomllib
from typing import Any

import pytest

from tests import fakehost
from tests.conftest import REPO, plan_for
from vmrun.host import facts
from vmrun.qemu.cmdline import FdInfo
from vmrun.tools import importer

CORPUS = REPO / "tests" / "libvirt"
HOST = fakehost.FakeHost(
    devices=(
        fakehost.FakePci("0000:01:00.0", group=1, cdev=0),
        fakehost.FakePci("0000:02:00.0", group=2, cdev=1, numa_node=1),
    ),
    taps=("vnet7",),
)


def argv_of(name: str, images: pathlib.Path) -> list[str]:
    lines = (CORPUS / f"{name}.args").read_text().splitlines()
    return [line.replace("@IMAGES@", str(images)) for line in lines if line and not line.startswith("#")]


# Each case: what /proc would show of the process's fds (--pid), and what the plan must pass.
CASES: dict[str, tuple[dict[int, FdInfo], dict[str, Any]]] = {
    "hostdevs": (
        {31: FdInfo(None)},
        {
            "name": "gpu-vm",
            "memory": "8G",
            "cpus": 4,
            "vfio": [("hostdev0", "host=0000:01:00.0", "legacy")],
            "disk": ["gpu-vm.qcow2"],
            "net": [("hostnet0", "user")],
            "vm": {},
        },
    ),
    "hugepages-iommufd": (
        {23: FdInfo("/dev/iommu"), 24: FdInfo("/dev/vfio/devices/vfio1"), 33: FdInfo("/dev/net/tun", "vnet7")},
        {
            "name": "hp-vm",
            "memory": "4G",
            "cpus": 8,
            "vfio": [("hostdev0", "host=0000:02:00.0", "iommufd0")],
            "disk": [],
            "net": [("hostnet0", "tap vnet7")],
            "vm": {"hugepages": "1G", "numa": 1},
        },
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_libvirt_command_lines_import_to_the_same_vm(name: str, tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "host", HOST)
    images = tmp_path / "images"
    images.mkdir()
    for image in ("gpu-vm.qcow2",):
        (images / image).write_bytes(b"QFI\xfb" + b"\0" * 508)  # a qcow2 header's magic
    fds, expected = CASES[name]
    imported = importer.import_argv(argv_of(name, images), fds, facts.Host(root))
    text = imported.text(f"{name}.args")
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    doc = tomllib.loads(text)
    # Nothing of libvirt's own is kept for QEMU: its monitor, master key, RAM object, ports.
    kept = " ".join(doc["vm"].get("args", []))
    for libvirt_only in ("charmonitor", "masterKey0", "pc.ram", "pcie-root-port", "-no-shutdown", "-msg", '"-S"'):
        assert libvirt_only not in kept, f"{libvirt_only} kept in vm.args:\n{text}"
    plan = plan_for(config, root)
    vm = doc["vm"]
    assert (vm["name"], vm["memory"], vm.get("cpus")) == (expected["name"], expected["memory"], expected["cpus"])
    assert [(d.id, d.source, d.backend) for d in plan.passthrough] == expected["vfio"], text
    planned_disks = [p for p in plan.parts if p.section == "disk"]
    assert [pathlib.Path(d["path"]).name for d in doc.get("disk", [])] == expected["disk"]
    assert len(planned_disks) == len(expected["disk"])
    nets = [(n["id"], f"tap {n['ifname']}" if n.get("type") == "tap" else "user") for n in doc.get("net", [])]
    assert nets == expected["net"], text
    for key, value in expected["vm"].items():
        assert vm.get(key) == value, (key, text)
    assert "-device" not in kept or "vfio-pci" not in kept
