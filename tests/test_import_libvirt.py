"""`vmrun import` of what libvirt writes: command lines in QEMU's JSON option syntax (each
device on a root port of its own, its monitor, master key and RAM object, fds for taps and
cdevs) and domain XML. Each case is imported, validated and planned on a fake host that has
its devices, and the plan must pass what the source passed: VFIO devices, iommufd objects,
disks, nics, memory and CPUs. (Our own corpus, in libvirt's documented forms; tests/libvirt/.)"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import tomllib
from typing import Any

import pytest
import tomli_w

from tests import fakehost
from tests.conftest import REPO, is_root, plan_for
from tests.test_vm_devices import running
from vmrun import cli
from vmrun.host import facts
from vmrun.qemu.cmdline import FdInfo
from vmrun.tools import import_domain, importer
from vmrun.tools.imported import Imported

CORPUS = REPO / "tests" / "libvirt"
HOST = fakehost.FakeHost(
    devices=(
        fakehost.FakePci("0000:01:00.0", group=1, cdev=0),
        fakehost.FakePci("0000:01:00.1", group=1, cdev=2),
        fakehost.FakePci("0000:02:00.0", group=2, cdev=1, numa_node=1),
    ),
    taps=("vnet7",),
    uefi=True,
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
    "numa-fdsets": (
        {30: FdInfo(None), 40: FdInfo("@IMAGES@/data.raw")},
        {
            "name": "numa-vm",
            "memory": "2G",
            "cpus": 4,
            "vfio": [("hostdev0", "host=0000:01:00.0", "legacy")],
            "disk": ["data.raw"],
            "net": [("hostnet0", "user")],
            "vm": {"numa": "off", "accel": "tcg"},
        },
    ),
}


def images_in(tmp_path: pathlib.Path) -> pathlib.Path:
    images = tmp_path / "images"
    images.mkdir()
    for image in ("gpu-vm.qcow2",):
        (images / image).write_bytes(b"QFI\xfb" + b"\0" * 508)  # a qcow2 header's magic
    (images / "data.raw").write_bytes(b"\0" * 4096)
    return images


def plans_the_same(imported: Imported, name: str, root: pathlib.Path, tmp_path: pathlib.Path, expected: Any) -> str:
    """Import's text validates and plans what the source passed; nothing of libvirt's own
    (its monitor, master key, RAM object, ports) is kept for QEMU."""
    text = imported.text(name)
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    doc = tomllib.loads(text)
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
    assert "vfio-pci" not in kept
    return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_libvirt_command_lines_import_to_the_same_vm(name: str, tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "host", HOST)
    images = images_in(tmp_path)
    fds, expected = CASES[name]
    fds = {
        fd: FdInfo(info.path.replace("@IMAGES@", str(images)), info.ifname) if info.path else info
        for fd, info in fds.items()
    }
    imported = importer.import_argv(argv_of(name, images), fds, facts.Host(root))
    plans_the_same(imported, name, root, tmp_path, expected)


def test_fds_without_pid_are_said_in_comments(tmp_path: pathlib.Path) -> None:
    """Without /proc to resolve them, the fd set's disk and the tap stay as they were, and each
    comment says whose fd it is; with it, they map (the cases above)."""
    text = importer.import_argv(argv_of("numa-fdsets", tmp_path), {}).text("numa-fdsets.args")
    assert '"-add-fd", "set=0,fd=40,opaque=libvirt-2-storage",' in text
    assert (
        "# -add-fd set=0,fd=40,opaque=libvirt-2-storage: not modelled by vmrun: kept as is; fd 40 is the caller's"
        in text
    )
    tap = importer.import_argv(argv_of("hugepages-iommufd", tmp_path), {}).text("hugepages-iommufd.args")
    assert "fd 33 is the caller's: run vmrun with it open, or import with --pid PID" in tap
    assert "# note: vfio hostdev0 takes fd 24, a VFIO cdev of the process that ran this command line" in tap


# Each domain: what the plan must pass, and the comments that must name what was left out.
DOMAINS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "gpu-vm": (
        {
            "name": "gpu-vm",
            "memory": "8G",
            "cpus": 4,
            "vfio": [("hostdev0", "host=0000:01:00.0", "legacy"), ("hostdev1", "host=0000:01:00.1", "legacy")],
            "disk": ["gpu-vm.qcow2"],
            "net": [("net0", "user")],
            "vm": {"firmware": "uefi", "cpu": "host", "console": "socket", "machine": "pc-q35-9.2", "accel": "kvm"},
        },
        [
            "# note: <disk type='file' device='cdrom'> ",  # not a disk image vmrun attaches
            "# note: <memballoon model='virtio'>: not modelled by vmrun",
            "# note: <controller>: pci pcie-root, pci pcie-root-port, usb qemu-xhci",
            "# note: <hostdev type='pci' mode='subsystem'>: 0000:01:00.0: libvirt binds it",
            "# note: <features>: not modelled by vmrun",
        ],
    ),
    "hp-vm": (
        {
            "name": "hp-vm",
            "memory": "4G",
            "cpus": 8,
            "vfio": [("hostdev0", "host=0000:02:00.0", "iommufd0")],
            "disk": [],
            "net": [("net0", "tap vnet7")],
            "vm": {"hugepages": "1G", "numa": 1, "viommu": "intel", "env": {"MESA_DEBUG": "1"}},
        },
        [
            "# note: <maxMemory>: memory hot-plug: vmrun has none",
            "# note: <locked>: vmrun sets the memlock limit VFIO needs",
            "# note: <interface type='bridge'>: libvirt makes the tap; vmrun uses an existing one: create vnet7",
            "# note: <graphics type='spice'>",
            '    "-smp", "8,sockets=1,cores=4,threads=2",',  # the topology vmrun cannot say
            '    "-global", "ICH9-LPC.disable_s3=1",',  # <qemu:commandline>
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_libvirt_domains_import_to_the_same_vm(name: str, tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "host", HOST)
    images = images_in(tmp_path)
    xml = (CORPUS / f"{name}.xml").read_text().replace("@IMAGES@", str(images))
    expected, comments = DOMAINS[name]
    text = plans_the_same(import_domain.import_domain(xml.encode(), f"{name}.xml"), name, root, tmp_path, expected)
    for comment in comments:
        assert comment in text, text


def test_cli_reads_domain_xml_from_stdin(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = (CORPUS / "hp-vm.xml").read_bytes()
    read, write = os.pipe()
    os.write(write, xml)
    os.close(write)
    monkeypatch.setattr("sys.stdin", os.fdopen(read, "r"))
    assert cli.main(["import", "--from-libvirt", "-", "-o", str(tmp_path / "hp.toml")]) == 0
    doc = tomllib.loads((tmp_path / "hp.toml").read_text())
    assert doc["vfio"] == [{"id": "hostdev0", "host": "0000:02:00.0", "iommufd": "iommufd0"}]
    assert "libvirt domain XML on standard input" in (tmp_path / "hp.toml").read_text()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<domain type='kvm'><name>&b;</name><memory>1048576</memory></domain>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]>
<domain type='kvm'><name>&x;</name><memory>1048576</memory></domain>"""


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (BILLION_LAUGHS, "d.xml: refused: "),
        (EXTERNAL, "d.xml: refused: "),
        (b"<domain><name>x</name><memory>1", "d.xml: not well-formed XML: "),
        (b"<network><name>x</name></network>", "d.xml: <network>: not a libvirt domain"),
        (b"<domain><memory>1048576</memory></domain>", "d.xml: <name>: missing; give the VM's name with --name"),
        (b"<domain><name>x</name></domain>", "d.xml: <memory>: missing"),
        (b"<domain><name>x</name><memory unit='parsecs'>1</memory></domain>", "d.xml: <memory unit='parsecs'>: "),
        (b"<domain><name>x</name><memory>1048576</memory><vcpu>many</vcpu></domain>", "d.xml: <vcpu>: 'many' is not"),
        (
            b"<domain><name>x</name><memory>1048576</memory><devices><hostdev mode='subsystem' type='pci'>"
            b"<source><address domain='0x0000' bus='zz' slot='0' function='0'/></source></hostdev></devices></domain>",
            "d.xml: <hostdev type='pci' mode='subsystem'>: <source><address> is not a PCI address",
        ),
    ],
    ids=["entities", "external-entity", "malformed", "not-a-domain", "no-name", "no-memory", "unit", "vcpu", "address"],
)
def test_bad_domain_xml_is_refused_naming_the_element(
    xml: bytes, message: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "d.xml"
    source.write_bytes(xml)
    out = tmp_path / "out.toml"
    assert cli.main(["import", "--from-libvirt", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err.replace(str(tmp_path) + "/", ""), err
    assert "Traceback" not in err and "aaaaaaaaaa" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            ["--from-libvirt", "DOMAIN"],
            "<disk type='file' device='disk'> /i.img (as disk[0].serial): \"bad serial!\" is not allowed",
        ),
        (["--", "qemu-system-x86_64", "-m", "lots"], '-m lots (as vm.memory): "lots" is not a size'),
        (["--", "qemu-system-x86_64", "-m", "1G", "-name", "a b"], '-name "a b" (as vm.name): "a b" is not allowed'),
    ],
    ids=["xml-serial", "argv-memory", "argv-name"],
)
def test_a_value_import_cannot_map_is_blamed_on_its_source(
    source: list[str], message: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not on imported.toml: the user never wrote that file."""
    domain = tmp_path / "d.xml"
    domain.write_text(
        "<domain><name>x</name><memory>1048576</memory><devices><disk type='file' device='disk'>"
        "<source file='/i.img'/><target dev='vda' bus='virtio'/><serial>bad serial!</serial></disk></devices></domain>"
    )
    argv = [str(domain) if a == "DOMAIN" else a for a in source]
    assert cli.main(["import", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "imported.toml" not in err and "Traceback" not in err


def test_unmapped_elements_are_comments_without_control_characters() -> None:
    # XML 1.0 has no ESC or BEL even as references; a newline and a bidi override it has.
    xml = (
        "<domain><name>x</name><memory>1048576</memory><devices>"
        "<disk type='file' device='cdrom'><source file='/a&#10;\u202e&#10;\"-sandbox\", \"off\",'/></disk>"
        "<watchdog model='i6300esb'/></devices><seclabel type='dynamic'/></domain>"
    )
    text = import_domain.import_domain(xml.encode(), "d.xml").text("d.xml")
    comments = [line for line in text.splitlines() if line.startswith("# note:")]
    assert all("\u202e" not in line for line in comments), text
    assert "# note: <watchdog model='i6300esb'>: not modelled by vmrun" in text
    assert "# note: <seclabel type='dynamic'>: not modelled by vmrun" in text
    assert "args" not in tomllib.loads(text)["vm"]  # the path's quotes did not become arguments


@pytest.mark.qemu
@pytest.mark.skipif(not is_root(), reason="needs root to run QEMU as nobody")
def test_an_imported_libvirt_guest_runs_on_real_qemu(tmp_path: pathlib.Path) -> None:
    """numa-fdsets without its hostdev, imported as `--pid` would see it, runs: two guest NUMA
    nodes on their own RAM objects (numa = "off" keeps vmrun's backend out), two sockets by
    the kept -smp merged over vmrun's, the fd set's disk read-only with O_DIRECT."""
    # Outside pytest's 0700 tree, root's and 0600: QEMU as nobody reads it through the fd only.
    images = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-img-"))
    images.chmod(0o755)
    image = images / "data.raw"
    image.write_bytes(b"\0" * (1 << 20))
    image.chmod(0o600)
    argv = argv_of("numa-fdsets", tmp_path)
    hostdev = next(i for i, a in enumerate(argv) if '"vfio-pci"' in a)
    del argv[hostdev - 1 : hostdev + 1]
    imported = importer.import_argv(argv, {30: FdInfo(None), 40: FdInfo(str(image))})
    doc = tomllib.loads(imported.text("numa-fdsets.args"))
    doc["vm"].update(user="nobody", memlock="off")
    doc["vm"]["args"] += ["-S"]
    for disk in doc["disk"]:
        disk["trusted"] = True  # root's 0600 image, as libvirt would have opened it
    cfg = tmp_path / "numa-vm.toml"
    cfg.write_text(tomli_w.dumps(doc))
    state = pathlib.Path(os.environ["VMRUN_STATE_DIR"])
    try:
        with running(cfg, state, "numa-vm") as (_, qmp):
            cpus = sorted(
                (c["props"]["node-id"], c["props"]["socket-id"], c["props"]["core-id"])
                for c in qmp.run("query-cpus-fast")
            )
            assert cpus == [(0, 0, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)]
            assert sorted(m["id"] for m in qmp.run("query-memdev")) == ["ram-node0", "ram-node1"]
            nodes = {n["node-name"]: n for n in qmp.run("query-named-block-nodes")}
            assert nodes["virtio-disk1-fmt"]["ro"] and nodes["virtio-disk1-file"]["cache"]["direct"]
    finally:
        shutil.rmtree(images)
