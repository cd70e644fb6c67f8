from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests import fakehost
from vmrun.base.sizes import MiB
from vmrun.config import loader
from vmrun.host import facts as host
from vmrun.host.facts import Launcher
from vmrun.host.qemu_caps import QemuCaps
from vmrun.kernel.opener import Opener
from vmrun.plan.planner import Plan, plan

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
    allowed_cpus: frozenset[int] = frozenset(range(8)),
) -> Plan:
    cfg = loader.load(path)
    # Files are opened as the caller, not the VM user: a plan must not depend on whether
    # the checkout is readable for nobody (a clone under a 0700 home is not).
    with Opener(None) as opener:
        # A fixed set of CPUs vmrun may use: the plan caps prealloc threads by it.
        facts = host.gather(
            cfg, root, qemu_caps=lambda _: caps, launcher=launcher, opener=opener, allowed_cpus=allowed_cpus
        )
        return plan(cfg, facts)


@pytest.fixture(scope="session")
def standard_host(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fakehost.build(tmp_path_factory.mktemp("host"), fakehost.STANDARD)


@pytest.fixture(scope="session")
def gpu_host(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fakehost.build(tmp_path_factory.mktemp("gpu-host"), fakehost.GPU_SERVER)


@pytest.fixture(scope="session")
def narrow_host(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fakehost.build(tmp_path_factory.mktemp("narrow-host"), fakehost.NARROW)


@pytest.fixture(scope="session")
def numa_host(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return fakehost.build(tmp_path_factory.mktemp("numa-host"), fakehost.TWO_NODES)


@pytest.fixture(scope="session")
def fake_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """The QEMU stand-in where nobody can run it: vmrun probes QEMU as the VM user, and a
    checkout under a 0700 home directory is out of that user's reach."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-fake-qemu-"))
    d.chmod(0o755)
    shutil.copy(REPO / "tests" / "fake-qemu", d / "fake-qemu")
    (d / "fake-qemu").chmod(0o755)
    yield d / "fake-qemu"
    shutil.rmtree(d)


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The QEMU capability cache and the running VMs' state must not leak between tests,
    # into the user's home or into /run/vmrun.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache" / "vmrun"))
    monkeypatch.setenv("VMRUN_STATE_DIR", str(tmp_path / "state"))
    # What QEMU keeps of the caller's environment, the same on every machine.
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.delenv("TZ", raising=False)


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def outdir() -> Iterator[pathlib.Path]:
    """A directory for a launch's QEMU stand-in and its record.

    QEMU may run as nobody: its stand-in and its record must be where nobody can reach,
    which neither pytest's temporary directories (mode 0700) nor a checkout under a 0700
    home directory are.
    """
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-test-"))
    d.chmod(0o1777)  # sticky: configs of root in it pass the trust rule (vmrun/base/trust.py)
    shutil.copy(REPO / "tests" / "fake-qemu", d / "fake-qemu")
    (d / "fake-qemu").chmod(0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def host_tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A host with two devices bound to vfio-pci, each with its cdev."""
    spec = fakehost.FakeHost(
        devices=(
            fakehost.FakePci("0000:01:00.0", cdev=0),
            fakehost.FakePci("0000:02:00.0", group=2, cdev=1),
        )
    )
    return fakehost.build(tmp_path_factory.mktemp("host"), spec)


class LocalUsers:
    """Two local users and a group, made for this test run: `owner` writes VM configs,
    `mallory` is the other local user who tries to steer vmrun (root) through them, and
    `ops` is a group of operators both are in."""

    owner = "vmrun-t-owner"
    mallory = "vmrun-t-mallory"
    ops = "vmrun-t-ops"

    def uid(self, name: str) -> int:
        import pwd

        return pwd.getpwnam(name).pw_uid

    def gid(self, name: str) -> int:
        import grp

        return grp.getgrnam(name).gr_gid

    def run_as(self, name: str, *argv: str, **kwargs: object) -> subprocess.Popen[str]:
        """A process of `name` (its uid, gid and groups), as the attacker's own shell would be."""
        import pwd

        pw = pwd.getpwnam(name)
        proc: subprocess.Popen[str] = subprocess.Popen(
            list(argv),
            user=pw.pw_uid,
            group=pw.pw_gid,
            extra_groups=[self.gid(self.ops)],
            cwd="/",
            text=True,
            **kwargs,  # type: ignore[call-overload]
        )
        return proc


@pytest.fixture(scope="session")
def local_users() -> Iterator[LocalUsers]:
    """LocalUsers, created with groupadd/useradd and removed at the end (root only)."""
    import grp
    import pwd

    if not is_root():
        pytest.skip("creating local users needs root")
    users = LocalUsers()
    made: list[list[str]] = []
    try:
        grp.getgrnam(users.ops)
    except KeyError:
        subprocess.run(["groupadd", "--system", users.ops], check=True)
        made.append(["groupdel", users.ops])
    for name in (users.owner, users.mallory):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", users.ops, name],
                check=True,
            )
            made.insert(0, ["userdel", name])
    yield users
    for argv in made:
        subprocess.run(argv, check=False, capture_output=True)
