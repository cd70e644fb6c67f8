"""`vmrun init`: a config from the host's devices, whole IOMMU groups, one iommufd object."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

from tests import fakehost
from tests.conftest import plan_for
from vmrun import cli

HOST = fakehost.FakeHost(
    devices=(
        fakehost.FakePci("0000:01:00.0", group=1, cdev=0, class_code="0x030000"),
        fakehost.FakePci("0000:01:00.1", group=1, cdev=1, class_code="0x040300"),
        fakehost.FakePci("0000:02:00.0", driver="e1000e", group=2, cdev=None, class_code="0x020000"),
        fakehost.FakePci("0000:00:1c.0", driver="pcieport", group=3, cdev=None, class_code="0x060400"),
        fakehost.FakePci("0000:03:00.0", group=3, cdev=2, class_code="0x010802"),
    )
)


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fakehost.build(tmp_path_factory.mktemp("host"), HOST)


def init(capsys: pytest.CaptureFixture[str], root: pathlib.Path, *args: str) -> tuple[int, str, str]:
    status = cli.main(["init", *args, "--host-root", str(root)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_a_device_brings_its_whole_group_and_one_iommufd(
    root: pathlib.Path, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    status, out, err = init(capsys, root, "w1", "--device", "01:00.0")
    assert (status, err) == (0, "")
    doc = tomllib.loads(out)
    assert doc == {
        "vm": {"name": "w1", "memory": "4G", "cpus": 2, "user": "nobody"},
        "iommufd": [{"id": "iommufd0"}],
        "vfio": [
            {"id": "gpu0", "host": "0000:01:00.0", "iommufd": "iommufd0"},
            {"id": "audio0", "host": "0000:01:00.1", "iommufd": "iommufd0"},
        ],
    }
    path = tmp_path / "w1.toml"
    path.write_text(out)
    p = plan_for(path, root)
    assert [f.path for f in p.fds[:3]] == ["/dev/iommu", "/dev/vfio/devices/vfio0", "/dev/vfio/devices/vfio1"]
    assert not [x for x in p.problems if x.path.startswith(("vfio", "iommufd"))]


def test_legacy(root: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = init(capsys, root, "w", "--legacy", "-d", "0000:03:00.0")
    doc = tomllib.loads(out)
    # The bridge in the NVMe's group stays with the host (pcieport keeps a group viable).
    assert (status, doc["vfio"], "iommufd" in doc) == (0, [{"id": "nvme0", "host": "0000:03:00.0"}], False)


def test_a_device_on_a_host_driver_is_written_and_named_with_the_fix(
    root: pathlib.Path, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    out_file = tmp_path / "net.toml"
    status, out, err = init(capsys, root, "net", "--device", "02:00.0", "--output", str(out_file))
    assert (status, out) == (0, "")
    written = tomllib.loads(out_file.read_text())
    assert written["vfio"] == [{"id": "nic0", "host": "0000:02:00.0", "iommufd": "iommufd0"}]
    assert err.splitlines() == [
        f"vmrun init: wrote {out_file} (drop-ins go in {out_file}.d/)",
        "vmrun init: 0000:02:00.0 is bound to e1000e: it must be bound to vfio-pci",
        f"vmrun init: bind them with: vmrun prepare {out_file}",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "0000:09:00.0"], "no PCI device 0000:09:00.0 on this host"),
        (["--device", "nine"], "not a PCI address: nine"),
        (["--device", "00:1c.0"], "0000:00:1c.0: a bridge is the host's own PCI plumbing"),
    ],
)
def test_bad_addresses_exit_2(
    root: pathlib.Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, out, err = init(capsys, root, "w", *args)
    assert (status, out) == (2, "")
    assert err.startswith("vmrun init: ") and message in err


def test_a_bad_name_exits_2_with_the_config_check(root: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = init(capsys, root, "bad/name", "--device", "01:00.0")
    assert (status, out) == (2, "")
    assert "vm.name:" in err


def test_never_overwrites_without_force(
    root: pathlib.Path, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    target = tmp_path / "vm.toml"
    target.write_text("mine")
    status, _, err = init(capsys, root, "w", "-d", "01:00.0", "-o", str(target))
    assert status == 2 and "exists: vmrun init does not overwrite it without --force" in err
    assert target.read_text() == "mine"
    # A symlink in its place is not followed, with or without --force.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("theirs")
    link = tmp_path / "link.toml"
    link.symlink_to(elsewhere)
    assert init(capsys, root, "w", "-d", "01:00.0", "-o", str(link))[0] == 2
    assert init(capsys, root, "w", "-d", "01:00.0", "-o", str(link), "--force")[0] == 0
    assert elsewhere.read_text() == "theirs" and not link.is_symlink()
    assert init(capsys, root, "w", "-d", "01:00.0", "-o", str(target), "--force")[0] == 0
    assert tomllib.loads(target.read_text())["vm"]["name"] == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link.toml", "vm.toml"]


def test_a_gpu_brings_its_audio_function_and_a_slot_reservation(
    gpu_host: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A workstation GPU: its HDMI audio function (same group) comes along, and the hot-plug
    slots reserve room for one more device like it (16 GiB + 32 MiB of 64-bit prefetchable
    BARs: 32 GiB); the plan sizes the window for the GPU itself."""
    status, out, err = init(capsys, gpu_host, "ws", "--device", "0a:00.0")
    assert status == 0, err
    doc = tomllib.loads(out)
    assert [d["host"] for d in doc["vfio"]] == ["0000:0a:00.0", "0000:0a:00.1"]
    assert doc["vm"]["hotplug_reserve"] == "32G"
    status, out, err = init(capsys, gpu_host, "nic", "--device", "06:00.0")
    assert "hotplug_reserve" not in tomllib.loads(out)["vm"]  # a 128 KiB BAR fits any slot
