"""`vmrun smoke` on real QEMU (TCG): passing and failing configs, the JUnit report, the boot
check against the demo guest, and the device check against a QEMU with devices behind a
PCI bridge."""

from __future__ import annotations

import os
import pathlib
import queue
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import tomli_w

from tests.conftest import REPO
from vmrun.config import loader
from vmrun.control import qmp, state
from vmrun.tools import smoke

DEMO = REPO / "configs" / "demo.toml"


def vmrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def write(tmp_path: pathlib.Path, name: str, vm: dict[str, Any] | None = None, **sections: Any) -> pathlib.Path:
    path = tmp_path / f"{name}.toml"
    settings = {"name": name, "memory": "64M", "accel": "tcg", "console": "none", "memlock": "off", **(vm or {})}
    path.write_text(tomli_w.dumps({"vm": settings, **sections}))
    return path


def no_vm_left() -> None:
    """Every VM smoke started is gone: no lock held, no process left behind."""
    for vm in state.all_vms():
        assert vm.state == "stopped", vm
        assert not state.lock_held(vm.lock_file)


def test_pci_ids_walks_buses_and_bridges() -> None:
    answer = [
        {
            "bus": 0,
            "devices": [
                {"qdev_id": "", "slot": 0},
                {
                    "qdev_id": "rp0",
                    "pci_bridge": {
                        "bus": {"number": 1},
                        "devices": [
                            {"qdev_id": "gpu0"},
                            {"qdev_id": "br1", "pci_bridge": {"bus": {"number": 2}, "devices": [{"qdev_id": "nic0"}]}},
                        ],
                    },
                },
            ],
        },
        {"bus": 0x80, "devices": [{"qdev_id": "pxb-dev"}]},
    ]
    assert smoke.pci_ids(answer) == {"rp0", "gpu0", "br1", "nic0", "pxb-dev"}


@pytest.mark.qemu
def test_smoke_passes_and_fails_with_a_junit_report(tmp_path: pathlib.Path) -> None:
    good = write(tmp_path, "good")
    bad = write(tmp_path, "bad", vfio=[{"id": "gpu0", "host": "0000:7f:1f.7"}])
    broken = tmp_path / "broken.toml"
    broken.write_text("[vm]\nname = 'x'\n")
    report = tmp_path / "out" / "smoke.xml"
    report.parent.mkdir()
    proc = vmrun("smoke", str(good), str(bad), str(broken), "--junit", str(report), "--timeout", "60")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"PASS {good}: QEMU started, nothing declared to verify ("), lines
    assert lines[1].startswith(f"FAIL {bad}: vmrun run ended (exit status 1): vmrun: the plan has problems:"), lines
    assert "vfio[0].host: no PCI device 0000:7f:1f.7 on this host" in lines[1]
    assert lines[2].startswith(f"FAIL {broken}: config: {broken}: vm.memory: "), lines
    assert re.fullmatch(r"smoke: 1 passed, 2 failed in [0-9.]+ s \(-j [0-9]+\)", lines[3]), lines
    assert "Traceback" not in proc.stdout + proc.stderr

    root = ET.parse(report).getroot()
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("3", "2")
    [suite] = root
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == [str(good), str(bad), str(broken)]
    assert cases[str(good)].find("failure") is None
    failure = cases[str(bad)].find("failure")
    assert failure is not None and "no PCI device 0000:7f:1f.7" in (failure.get("message") or "")
    err = cases[str(bad)].find("system-err")
    assert err is not None and (err.text or "").startswith("vmrun: the plan has problems:")
    assert all(float(c.get("time") or "-1") >= 0 for c in cases.values())
    no_vm_left()


@pytest.mark.qemu
def test_parallel_smoke_keeps_the_input_order_and_gives_each_config_its_own_state(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The private state directories are made here, and must be gone afterwards.
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    # Both named "twin": they only pass side by side with a state directory each.
    slow = write(tmp_path, "slow", {"name": "twin"})
    twin = write(tmp_path, "twin")
    broken = tmp_path / "broken.toml"
    broken.write_text("[vm]\nname = 'x'\n")
    report = tmp_path / "smoke.xml"
    proc = vmrun("smoke", "-j", "3", str(slow), str(twin), str(broken), "--junit", str(report))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [
        ["PASS", f"{slow}:"],
        ["PASS", f"{twin}:"],
        ["FAIL", f"{broken}:"],
    ]
    assert re.fullmatch(r"smoke: 2 passed, 1 failed in [0-9.]+ s \(-j 3\)", lines[3]), lines
    # As they come: the broken config, which needs no QEMU, is done first.
    progress = [line for line in proc.stderr.splitlines() if line.startswith("smoke: [")]
    assert len(progress) == 3 and progress[0].startswith(f"smoke: [1/3] FAIL {broken}:"), proc.stderr
    cases = [c.get("name") for c in ET.parse(report).getroot().iter("testcase")]
    assert cases == [str(slow), str(twin), str(broken)]
    assert list(temp.iterdir()) == []
    no_vm_left()


@pytest.mark.qemu
def test_the_smoke_configs_pass_side_by_side() -> None:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "smoke").glob("*.toml"))
    proc = vmrun("smoke", "-j", "2", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines()[:-1]] == [f"{f}:" for f in files]
    no_vm_left()


@pytest.mark.qemu
def test_smoke_boots_the_demo_guest_to_its_line() -> None:
    if not (REPO / "build" / "demo" / "vmlinuz").exists():
        pytest.fail("build/demo is missing: scripts/install builds the demo guest")
    proc = vmrun("smoke", str(DEMO), "--boot", r"vmrun-demo: guest up, kernel \S+", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "console matched 'vmrun-demo: guest up, kernel \\\\S+'" in proc.stdout, proc.stdout
    # The demo guest powers off right after its line: a pattern it never prints fails.
    proc = vmrun("smoke", str(DEMO), "--boot", "never printed", "--timeout", "120")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "QEMU exited (status 0) before a console line matched" in proc.stdout
    no_vm_left()


@pytest.mark.qemu
def test_smoke_boot_reads_a_console_socket(tmp_path: pathlib.Path) -> None:
    if not (REPO / "build" / "demo" / "vmlinuz").exists():
        pytest.fail("build/demo is missing: scripts/install builds the demo guest")
    demo = {
        "memory": "256M",
        "console": "socket",
        "kernel": str(REPO / "build" / "demo" / "vmlinuz"),
        "initrd": str(REPO / "build" / "demo" / "initrd"),
        "append": "console=ttyS0 quiet panic=-1",
        "args": ["-no-reboot"],
    }
    cfg = write(tmp_path, "sockdemo", demo)
    proc = vmrun("smoke", str(cfg), "--boot", "vmrun-demo: guest up", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"PASS {cfg}: QEMU started, nothing declared to verify; console matched")
    no_vm_left()


@pytest.mark.qemu
def test_smoke_boot_timeout_kills_the_vm(tmp_path: pathlib.Path) -> None:
    # Firmware with no OS prints nothing on the serial console: the pattern never comes.
    silent = write(tmp_path, "silent", {"console": "stdio"})
    start = time.monotonic()
    proc = vmrun("smoke", str(silent), "--boot", "login:", "--timeout", "4")
    took = time.monotonic() - start
    assert proc.returncode == 1
    assert f"FAIL {silent}: no console line matched 'login:' in time" in proc.stdout, proc.stdout
    assert took < 4 + 10
    no_vm_left()


@pytest.mark.qemu
def test_smoke_boot_needs_a_serial_console(tmp_path: pathlib.Path) -> None:
    quiet = write(tmp_path, "quiet")
    proc = vmrun("smoke", str(quiet), "--boot", "x")
    assert proc.returncode == 1
    assert 'vm.console is "none": no serial console to match --boot against' in proc.stdout


def test_smoke_usage_errors(tmp_path: pathlib.Path) -> None:
    proc = vmrun("smoke", str(tmp_path / "x.toml"), "--boot", "(")
    assert proc.returncode == 2 and "vmrun smoke: --boot '(' is not a regular expression" in proc.stderr
    proc = vmrun("smoke", str(tmp_path / "x.toml"), "--timeout", "soon")
    assert proc.returncode == 2 and "'soon' is not a number of seconds" in proc.stderr
    good = write(tmp_path, "unwritable")
    proc = vmrun("smoke", str(good), "--junit", str(tmp_path / "no" / "such" / "dir.xml"), "--timeout", "30")
    assert proc.returncode == 1 and "vmrun smoke: cannot write" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.qemu
def test_verify_finds_devices_behind_a_bridge_and_reports_what_is_missing(tmp_path: pathlib.Path) -> None:
    # What QEMU made (a root port with a device behind it) against what configs declare:
    # the check reads query-pci and the QOM tree exactly as it does for VFIO devices.
    args = ["-device", "pcie-root-port,id=rp0,chassis=99,bus=pcie.0", "-device", "virtio-rng-pci,id=rng9,bus=rp0"]
    cfg_file = write(tmp_path, "mu", {"args": args})
    child = subprocess.Popen(
        [sys.executable, "-m", "vmrun.cli", "run", "--paused", str(cfg_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            vm = state.load("mu")
            if vm is not None and vm.running and vm.pid == child.pid:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with qmp.Monitor(vm.qmp_socket) as m:
            # Paused before the firmware ran, the root port's bus has no number yet:
            # query-pci does not show what is behind it, QOM does.
            assert "rp0" in smoke.pci_ids(m.execute("query-pci"))
            deadline = time.monotonic() + 30
            smoke.verify(m, smoke.Expected(devices=(("rng9", "virtio-rng-pci"), ("rp0", "pcie-root-port"))), deadline)
            smoke.verify(m, smoke.Expected(objects=(("guest-ram", "memory-backend-memfd"),)), deadline)
            wrong = smoke.Expected(
                devices=(("rng9", "vfio-pci"), ("gpu0", "vfio-pci"), ("plat0", "vfio-platform")),
                objects=(("iommufd0", "iommufd"), ("guest-ram", "iommufd")),
            )
            with pytest.raises(smoke.Failed) as e:
                smoke.verify(m, wrong, deadline)
            assert str(e.value).split("; ") == [
                "rng9 is a virtio-rng-pci, not a vfio-pci",
                "vfio-pci gpu0 does not exist (Device '/machine/peripheral/gpu0' not found)",
                "vfio-platform plat0 does not exist (Device '/machine/peripheral/plat0' not found)",
                "iommufd object iommufd0 does not exist",
                "object guest-ram is a child<memory-backend-memfd>, not a child<iommufd>",
            ]
            # Once the firmware has numbered the buses, the walk finds the device behind the port.
            m.execute("cont")
            deadline = time.monotonic() + 30
            while "rng9" not in smoke.pci_ids(m.execute("query-pci")):
                assert time.monotonic() < deadline, "the firmware did not number the root port's bus"
                time.sleep(0.1)
            m.execute("quit")
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_expected_from_a_config(tmp_path: pathlib.Path) -> None:
    cfg = write(
        tmp_path,
        "declared",
        iommufd=[{"id": "iommufd0"}],
        vfio=[
            {"id": "gpu0", "host": "0000:01:00.0", "iommufd": "iommufd0"},
            {"id": "plat0", "driver": "vfio-platform", "sysfsdev": "/sys/bus/platform/devices/x"},
        ],
    )
    expected = smoke.Expected.of(loader.load(cfg))
    assert expected == smoke.Expected(
        devices=(("gpu0", "vfio-pci"), ("plat0", "vfio-platform")), objects=(("iommufd0", "iommufd"),)
    )
    assert expected.summary() == "verified 2 vfio devices and 1 iommufd object"


def test_console_reader_hands_on_prompts_without_a_newline() -> None:
    r, w = os.pipe()
    keep: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    with os.fdopen(r, "rb") as stream:
        os.write(w, b"Debian GNU/Linux 12 vm ttyS0\r\n\r\nvm log")
        os.write(w, b"in: ")
        os.close(w)
        smoke.Child.read(stream, keep, lines)
    got = []
    while (item := lines.get_nowait()) is not None:
        got.append(item)
    assert any(re.search("login: $", line) for line in got), got
    assert keep == ["Debian GNU/Linux 12 vm ttyS0", "", "vm login: "]


def test_junit_of_no_results_is_valid() -> None:
    root = ET.fromstring(smoke.junit([], 0.0))
    assert (root.get("tests"), root.get("failures")) == ("0", "0")
    assert smoke.Result("a.toml", True, "ok", 1.0).line() == "PASS a.toml: ok (1.0 s)"


def test_smoke_passes_the_callers_fds_to_the_launch(tmp_path: pathlib.Path) -> None:
    # QEMU keeps an iommufd object's fd unused until a device needs it, so a config with
    # only a caller-provided object starts, and smoke sees the object, when fd 9 arrives.
    cfg = write(tmp_path, "fdpass", iommufd=[{"id": "iommufd0", "fd": 9}])
    command = f"exec 9<>/dev/null; exec {sys.executable} -m vmrun.cli smoke --timeout 60 {cfg}"
    passed = subprocess.run(["/bin/sh", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.startswith(f"PASS {cfg}: "), passed.stdout
    missing = vmrun("smoke", "--timeout", "60", str(cfg))
    assert missing.returncode == 1
    assert "fd 9 (iommufd iommufd0 (from the caller)) is not open in vmrun's process" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr
    no_vm_left()
