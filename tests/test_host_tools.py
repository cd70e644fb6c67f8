"""`vmrun check`, `vmrun devices` and `vmrun bind`/`unbind` on fake host trees.

The sysfs writes of bind/unbind land in plain files here, so these tests pin the
sequence that is written and every refusal; the real kernel's answer is tested in the
nested bed (tests/e2e).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest
import tomli_w

from tests import fakehost
from tests.conftest import REPO, ROOT, plan_for
from vmrun import cli
from vmrun.host import pci
from vmrun.host.facts import Host
from vmrun.launch.bind import Binder, BindError
from vmrun.tools import check

PCI_IDS = """\
# a few lines in the format of pci.ids
1234  Technical Corp.
\t11e8  QEMU PCI Test Device
8086  Intel Corporation
\t10d3  82574L Gigabit Network Connection
C 00  Unclassified device
\tff  Miscellaneous
C 02  Network controller
\t00  Ethernet controller
"""


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> pathlib.Path:
    spec = fakehost.FakeHost(
        devices=(
            fakehost.FakePci(
                "0000:01:00.0",
                group=1,
                cdev=0,
                bars=(
                    fakehost.FakeBar(0, 1 << 20, is64=False, prefetch=False),
                    fakehost.FakeBar(1, 128 << 30),
                    fakehost.FakeBar(3, 32 << 20),
                ),
                reset_method="flr bus",
            ),
            fakehost.FakePci(
                "0000:02:00.0",
                driver="e1000e",
                group=2,
                cdev=None,
                vendor="0x8086",
                device="0x10d3",
                class_code="0x020000",
                reset_method="",
            ),
            fakehost.FakePci("0000:03:00.0", driver=None, group=3, cdev=None),
            fakehost.FakePci("0000:05:00.0", driver=None, group=5, cdev=None),
            fakehost.FakePci("0000:05:00.1", driver="snd_hda_intel", group=5, cdev=None),
        )
    )
    root = fakehost.build(tmp_path / "host", spec)
    (root / "sys" / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True, exist_ok=True)
    ids = root / "usr" / "share" / "misc" / "pci.ids"
    ids.parent.mkdir(parents=True)
    ids.write_text(PCI_IDS)
    return root


def test_devices_table(tree: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices", "--host-root", str(tree), "01:00.0", "0000:02:00.0"]) == 0
    assert capsys.readouterr().out == (
        "ADDRESS       ID         CLASS                DRIVER    GROUP  VFIO CDEV  BARS         RESET    NAME\n"
        "0000:01:00.0  1234:11e8  Miscellaneous        vfio-pci  1      vfio0      128G+32M+1M  flr,bus  "
        "Technical Corp. QEMU PCI Test Device\n"
        "0000:02:00.0  8086:10d3  Ethernet controller  e1000e    2      -          -            none     "
        "Intel Corporation 82574L Gigabit Network Connection\n"
    )


def test_devices_json_and_group_filter(tree: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices", "--host-root", str(tree), "--group", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["address"], d["driver"]) for d in data] == [("0000:05:00.0", None), ("0000:05:00.1", "snd_hda_intel")]


def test_devices_rejects_bad_address(tree: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices", "--host-root", str(tree), "zz:00.0"]) == 2
    assert "vmrun devices: not a PCI address: zz:00.0" in capsys.readouterr().err


def test_devices_without_pci_ids(tmp_path: pathlib.Path) -> None:
    root = fakehost.build(tmp_path / "h", fakehost.FakeHost(devices=(fakehost.FakePci("0000:01:00.0"),)))
    (d,) = pci.list_devices(Host(root))
    assert (d.vendor, d.device, d.vendor_name, d.class_name) == ("1234", "11e8", None, None)


def write_config(tmp_path: pathlib.Path, devices: list[dict[str, object]]) -> pathlib.Path:
    path = tmp_path / "vm.toml"
    data = {"vm": {"name": "t", "memory": "1G", "user": "nobody"}, "iommufd": [{"id": "i0"}], "vfio": devices}
    path.write_text(tomli_w.dumps(data))
    return path


def test_check_report_names_each_problem_and_fix(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cfg = write_config(
        tmp_path,
        [
            {"id": "ok0", "host": "0000:01:00.0", "iommufd": "i0"},
            {"id": "nic", "host": "0000:02:00.0", "iommufd": "i0"},
            {"id": "snd", "host": "0000:05:00.0", "iommufd": "i0"},
        ],
    )
    report = check.check(plan_for(cfg, tree, launcher=ROOT))
    assert not report.ok
    assert check.text(report).splitlines() == [
        f"# vmrun check for {cfg}",
        "ok    vm.qemu     QEMU 10.0.2 at qemu-system-x86_64, with the iommufd backend; no cpr-transfer",
        "ok    vm.user     QEMU will run as nobody (uid 65534, gid 65534)",
        "ok    vm.memlock  vmrun may set RLIMIT_MEMLOCK to 1088 MiB (1 DMA address space (iommufd i0) x 1024 MiB RAM"
        " + 64 MiB margin) (CAP_SYS_RESOURCE)",
        "ok    iommufd[0]  /dev/iommu exists",
        "ok    vfio[0]     host=0000:01:00.0 is bound to vfio-pci; IOMMU group 1 (1 devices) is viable",
        "ok    vfio[0]     VFIO cdev /dev/vfio/devices/vfio0 exists",
        "fail  vfio[1]     host=0000:02:00.0 is bound to e1000e, not vfio-pci",
        "                  fix: vmrun bind 0000:02:00.0",
        "fail  vfio[2]     host=0000:05:00.0 is bound to no driver, not vfio-pci",
        "                  fix: vmrun bind 0000:05:00.0",
        "ok    vm.user     no other running VM runs as nobody",
        "# cannot launch: 2 failed, 0 warnings",
    ]


def test_check_cli_exit_status(tree: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path, [{"id": "ok0", "host": "0000:01:00.0", "iommufd": "i0"}])
    status = cli.main(["check", str(good), "--host-root", str(tree), "--json"])
    data = json.loads(capsys.readouterr().out)
    failed = [c for c in data["checks"] if c["status"] == "fail"]
    # On a host where vmrun may not raise RLIMIT_MEMLOCK, that is the only failure.
    assert all(c["path"] == "vm.memlock" for c in failed), failed
    assert status == (1 if failed else 0) and data["ok"] == (not failed)


def writes(root: pathlib.Path, address: str) -> dict[str, str]:
    dev = root / "sys" / "bus" / "pci" / "devices" / address
    return {
        "override": (dev / "driver_override").read_text(),
        "probe": (root / "sys" / "bus" / "pci" / "drivers_probe").read_text(),
    }


def test_bind_refuses_non_viable_group(tree: pathlib.Path) -> None:
    with pytest.raises(BindError) as e:
        Binder(Host(tree)).bind(["0000:05:00.0"])
    assert str(e.value).startswith(
        "0000:05:00.0: its IOMMU group would not be viable: 0000:05:00.1 (snd_hda_intel) stays on a host driver"
    )
    assert writes(tree, "0000:05:00.0")["override"] == "(null)\n", "nothing may be written on a refusal"


def test_bind_refuses_unknown_device_and_missing_driver(tree: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bind", "--host-root", str(tree), "0000:09:00.0"]) == 1
    assert "vmrun: no PCI device 0000:09:00.0 on this host" in capsys.readouterr().err
    (tree / "sys" / "bus" / "pci" / "drivers" / "vfio-pci").rename(tree / "gone")
    assert cli.main(["bind", "--host-root", str(tree), "0000:03:00.0"]) == 1
    assert "the vfio-pci driver is not loaded\n  hint: modprobe vfio-pci" in capsys.readouterr().err


def test_bind_already_bound_is_a_no_op(tree: pathlib.Path) -> None:
    (change,) = Binder(Host(tree)).bind(["0000:01:00.0"])
    assert change.render() == "0000:01:00.0: already bound (/dev/vfio/devices/vfio0)"


def test_bind_that_does_not_take_is_rolled_back(tree: pathlib.Path) -> None:
    # The fake kernel never binds: the device stays on e1000e, so bind must fail, and
    # give back what it changed: the override cleared, the remembered driver forgotten.
    with pytest.raises(BindError) as e:
        Binder(Host(tree)).bind(["0000:02:00.0"])
    assert str(e.value).startswith("0000:02:00.0 did not bind to vfio-pci (driver now: e1000e)")
    drivers = tree / "sys" / "bus" / "pci" / "drivers"
    assert (drivers / "e1000e" / "unbind").read_text() == "0000:02:00.0"
    assert writes(tree, "0000:02:00.0")["override"] == "\n"
    assert not (tree / "run" / "vmrun-bind" / "0000:02:00.0.json").exists()


def test_unbind_restores_the_remembered_driver(tree: pathlib.Path) -> None:
    state = tree / "run" / "vmrun-bind" / "0000:01:00.0.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"driver": "e1000e"}))
    (change,) = Binder(Host(tree)).unbind(["0000:01:00.0"])
    assert change.action == "restored"
    drivers = tree / "sys" / "bus" / "pci" / "drivers"
    assert (drivers / "vfio-pci" / "unbind").read_text() == "0000:01:00.0"
    assert (drivers / "e1000e" / "bind").read_text() == "0000:01:00.0"
    assert not state.exists()


def test_unbind_of_a_device_vmrun_did_not_bind(tree: pathlib.Path) -> None:
    (change,) = Binder(Host(tree)).unbind(["0000:02:00.0"])
    assert change.render() == "0000:02:00.0: not bound (driver e1000e)"


def record_dir(tree: pathlib.Path) -> pathlib.Path:
    d = tree / "run" / "vmrun-bind"
    d.mkdir(parents=True, mode=0o700, exist_ok=True)
    return d


def test_bind_records_are_data_never_paths(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    records = record_dir(tree)
    # A record that is a symlink is not followed.
    (records / "0000:01:00.0.json").symlink_to(target)
    with pytest.raises(BindError, match="is a symlink: vmrun does not follow links"):
        Binder(Host(tree)).unbind(["0000:01:00.0"])
    # A driver is a name the kernel knows, never a path.
    (records / "0000:01:00.0.json").unlink()
    (records / "0000:01:00.0.json").write_text(json.dumps({"driver": "../../../../tmp/x"}))
    with pytest.raises(BindError, match=r"names no driver: '\.\./\.\./\.\./\.\./tmp/x'"):
        Binder(Host(tree)).unbind(["0000:01:00.0"])
    (records / "0000:01:00.0.json").write_text(json.dumps({"driver": "no_such_driver"}))
    with pytest.raises(BindError, match="names the driver no_such_driver, which this kernel does not have"):
        Binder(Host(tree)).unbind(["0000:01:00.0"])
    drivers = tree / "sys" / "bus" / "pci" / "drivers"
    assert (drivers / "vfio-pci" / "unbind").read_text() == "", "nothing is written on a refusal"
    assert target.read_text() == "root's file\n"
    # The records' directory itself may not be redirected either.
    shutil.rmtree(records)
    records.symlink_to(tmp_path)
    with pytest.raises(BindError, match="is a symlink: vmrun does not follow links"):
        Binder(Host(tree)).bind(["0000:03:00.0"])
    assert writes(tree, "0000:03:00.0")["override"] == "(null)\n"


def test_bind_records_live_apart_from_vm_names() -> None:
    # A VM may be called "bind": its state directory is <state base>/bind, never the records.
    from vmrun.launch import bind

    assert bind.STATE_DIR == "/run/vmrun-bind" and not bind.STATE_DIR.startswith("/run/vmrun/")


def test_bind_refuses_a_bridge_before_writing(tmp_path: pathlib.Path) -> None:
    spec = fakehost.FakeHost(devices=(fakehost.FakePci("0000:00:1c.0", driver="pcieport", class_code="0x060400"),))
    root = fakehost.build(tmp_path / "h", spec)
    (root / "sys" / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True)
    with pytest.raises(BindError, match=r"0000:00:1c\.0 is a bridge"):
        Binder(Host(root)).bind(["0000:00:1c.0"])
    assert writes(root, "0000:00:1c.0")["override"] == "(null)\n"
    assert not (root / "run" / "vmrun-bind").exists()


def test_ctrl_c_during_bind_rolls_back(tree: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binder = Binder(Host(tree))
    real_write = binder.write

    def interrupted(path: str, value: str) -> None:
        real_write(path, value)
        if path.endswith("/driver/unbind"):
            raise KeyboardInterrupt  # Ctrl-C right after the device left its driver

    monkeypatch.setattr(binder, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        binder.bind(["0000:02:00.0"])
    assert writes(tree, "0000:02:00.0")["override"] == "\n", "the override is cleared again"
    # (The fake kernel keeps the driver link, so the device counts as never having left it.)
    assert not (tree / "run" / "vmrun-bind" / "0000:02:00.0.json").exists(), "the record is forgotten"


def test_bind_refuses_a_damaged_record_before_writing(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # A record left from an earlier bind is what unbind will follow: a bind that would keep
    # it must refuse it first, not find out halfway through a rollback.
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    records = record_dir(tree)
    record = records / "0000:02:00.0.json"
    cases: list[tuple[str | None, str]] = [
        (json.dumps({"driver": "../../x"}), r"names no driver: '\.\./\.\./x'"),
        ("{not json", "is damaged"),
        (None, "is a symlink: vmrun does not follow links"),
        (" " * 5000, "is larger than 4096 bytes"),
    ]
    for text, message in cases:
        record.unlink(missing_ok=True)
        if text is None:
            record.symlink_to(target)
        else:
            record.write_text(text)
        with pytest.raises(BindError, match=message):
            Binder(Host(tree)).bind(["0000:02:00.0"])
        assert writes(tree, "0000:02:00.0")["override"] == "(null)\n", "nothing may be written on a refusal"
        assert (tree / "sys" / "bus" / "pci" / "drivers" / "e1000e" / "unbind").read_text() == ""
        assert target.read_text() == "root's file\n"


def test_a_vm_named_bind_does_not_touch_bind_records(
    tree: pathlib.Path, outdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_launch import config, run_recorded, vmrun

    # Root's layout under the fake host: the VMs' state base and the bind records side by side.
    base = tree / "run" / "vmrun"
    monkeypatch.setenv("VMRUN_STATE_DIR", str(base))
    records = record_dir(tree)
    (records / "0000:01:00.0.json").write_text(json.dumps({"driver": "e1000e"}))
    before = {p.name: p.read_text() for p in records.iterdir()}
    run_recorded(config(outdir, {"name": "bind", "memlock": "off"}), outdir, "--host-root", str(tree))
    assert sorted(p.name for p in (base / "bind").iterdir()) == ["lock", "pid", "qmp.sock", "state.json"]
    # The VM has ended (the stand-in exits): ps tidies its record, status and stop say so.
    for command in (["ps", "--all"], ["status", "bind"], ["stop", "bind"]):
        assert "Traceback" not in vmrun(*command).stderr
    assert sorted(p.name for p in (base / "bind").iterdir()) == ["lock", "qmp.sock"]
    assert {p.name: p.read_text() for p in records.iterdir()} == before
    # And the records are still what unbind goes by.
    (change,) = Binder(Host(tree)).unbind(["0000:01:00.0"])
    assert change.action == "restored"
    assert (tree / "sys" / "bus" / "pci" / "drivers" / "e1000e" / "bind").read_text() == "0000:01:00.0"
    assert (base / "bind" / "lock").exists(), "unbind leaves the VM's directory alone"


def test_ctrl_c_during_bind_from_the_command_line(tree: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = Binder.write

    def interrupted(self: Binder, path: str, value: str) -> None:
        real_write(self, path, value)
        if path.endswith("/driver_override") and value == "vfio-pci":
            raise KeyboardInterrupt  # Ctrl-C once the override is set, before the driver lets go

    monkeypatch.setattr(Binder, "write", interrupted)
    assert cli.main(["bind", "--host-root", str(tree), "0000:02:00.0"]) == 130
    assert writes(tree, "0000:02:00.0")["override"] == "\n", "the override is cleared again"
    assert (tree / "sys" / "bus" / "pci" / "drivers" / "e1000e" / "unbind").read_text() == ""
    assert not (tree / "run" / "vmrun-bind" / "0000:02:00.0.json").exists(), "the record is forgotten"


def test_one_viability_rule_for_requirements_bind_and_init(tmp_path: pathlib.Path) -> None:
    """The kernel lets a group be used by VFIO when every member is unbound, on a VFIO driver
    or pci-stub, or is a bridge (on any driver: pcieport, shpchp). The preflight, `vmrun
    bind` and `vmrun init` judge a group by that one rule (host/sysfs.py)."""
    from vmrun.host import sysfs
    from vmrun.tools import init

    assert [sysfs.keeps_group_viable(d, "0x020000") for d in (None, "vfio-pci", "pci-stub", "e1000e", "pcieport")] == [
        True,
        True,
        True,
        False,
        False,  # pcieport on an endpoint is a host driver like any other
    ]
    assert sysfs.keeps_group_viable("shpchp", "0x060400") and sysfs.keeps_group_viable("pcieport", "0x060400")
    root = fakehost.build(
        tmp_path,
        fakehost.FakeHost(
            devices=(
                fakehost.FakePci("0000:03:00.0", group=7, cdev=0),
                fakehost.FakePci("0000:00:1c.0", driver="shpchp", group=7, cdev=None, class_code="0x060400"),
            )
        ),
    )
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        '[vm]\nname = "g"\nmemory = "1G"\n[[iommufd]]\nid = "io"\n'
        '[[vfio]]\nid = "d"\nhost = "03:00.0"\niommufd = "io"\n'
    )
    findings = [f for f in plan_for(cfg, root).findings if f.problem.path == "vfio[0]"]
    assert all(f.status == "ok" for f in findings)
    assert any("IOMMU group 7 (2 devices) is viable" in f.problem.message for f in findings)
    Binder(Host(root)).check_groups(["0000:03:00.0"])  # no BindError
    result = init.build("g", ["0000:03:00.0"], Host(root))
    assert result.warnings == () and "00:1c.0" not in result.text


def test_check_and_devices_say_what_real_devices_break(
    gpu_host: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the GPU host: `check` warns about the boot VGA device, the audio function left
    behind and a NIC without reset; `devices` shows BARs and reset methods."""
    golden = REPO / "tests" / "golden"
    cli.main(["check", str(golden / "gpu-audio-group.toml"), "--host-root", str(gpu_host)])  # other checks fail here
    out = capsys.readouterr().out
    assert re.search(r"^warn  vfio\[0\] +host=0000:0a:00.0 is the host's boot VGA device", out, re.M), out
    assert "0000:0a:00.1 shares IOMMU group 10 with host=0000:0a:00.0 and is bound to vfio-pci but not passed" in out
    cli.main(["check", str(golden / "gpu-nic-no-reset.toml"), "--host-root", str(gpu_host)])
    assert "host=0000:06:00.0 has no reset method" in capsys.readouterr().out
    assert cli.main(["devices", "--host-root", str(gpu_host), "41:00.0", "06:00.0"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[6:8] == ["128K", "none"] and rows[2].split()[6:8] == ["128G+32M+16M", "flr,bus"]
