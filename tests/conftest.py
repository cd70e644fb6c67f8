from __future__ import annotations

import os
import pathlib

import pytest

from tests import fakehost
from vmrun import config, host
from vmrun.host import Launcher
from vmrun.plan import Plan, plan
from vmrun.qemu_caps import QemuCaps
from vmrun.sizes import MiB

REPO = pathlib.Path(__file__).resolve().parent.parent
VFIO_PCI_PROPS = ("fd", "host", "iommufd", "rombar", "romfile", "sysfsdev", "x-vga")
FAKE_CAPS = QemuCaps(
    path="qemu-system-x86_64",
    version=(10, 0, 2),
    has_iommufd=True,
    device_props={"vfio-pci": VFIO_PCI_PROPS, "vfio-platform": ("host", "sysfsdev")},
)
ROOT = Launcher(uid=0, cap_sys_resource=True, cap_ipc_lock=True, memlock_soft=8 * MiB, memlock_hard=8 * MiB)
UNPRIVILEGED = Launcher(
    uid=1000, cap_sys_resource=False, cap_ipc_lock=False, memlock_soft=8 * MiB, memlock_hard=8 * MiB
)


def plan_for(
    path: pathlib.Path | str,
    root: pathlib.Path,
    caps: QemuCaps | None = FAKE_CAPS,
    launcher: Launcher = ROOT,
) -> Plan:
    cfg = config.load(path)
    return plan(cfg, host.gather(cfg, root, qemu_caps=lambda _: caps, launcher=launcher))


@pytest.fixture(scope="session")
def standard_host(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fakehost.build(tmp_path_factory.mktemp("host"), fakehost.STANDARD)


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The QEMU capability cache and the running VMs' state must not leak between tests,
    # into the user's home or into /run/vmrun.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUN_STATE_DIR", str(tmp_path / "state"))


def is_root() -> bool:
    return os.geteuid() == 0
