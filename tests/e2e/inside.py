"""Scenario runner of the e2e test bed; runs INSIDE the L1 VM, as root.

Each scenario is a function registered with @scenario. It starts L2 QEMUs (TCG, -S, a
QMP socket) against the edu devices bound to vfio-pci in L1, raises Failed with an
explanation when a fact does not hold, and returns details worth reporting. All
scenarios run in one boot; the results go to $VMRUN_E2E_RESULTS/scenarios.json, which
is rewritten after every scenario so that a timeout still leaves partial results. A
scenario that leaves L1 changed (a device off vfio-pci, a node moved or chowned, a QEMU
still running) fails, and the runner puts L1 back for the next one.

Usage (inside L1): inside.py [--out FILE] [--only NAME]...
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
VMRUN = CHECKOUT / ".venv" / "bin" / "vmrun"
# L2's QEMU: L0's (bookworm-backports), or the newer stack's (bed.cpr_qemu_path) when set.
QEMU = os.environ.get("VMRUN_E2E_QEMU", "qemu-system-x86_64")
EDU_VENDOR, EDU_DEVICE = "0x1234", "0x11e8"
IVSHMEM_IDS = ("0x1af4", "0x1110")  # ivshmem-plain: the bed's big-BAR devices
USER = "nobody"
MIB = 1024 * 1024
GIB = 1024 * MIB
L2_RAM_MIB = 256
# vmrun.memlock.MARGIN: how far above the need vmrun's memlock=auto may lie (its README).
VMRUN_MEMLOCK_MARGIN_MIB = 64
# Starting L2 under nested TCG takes seconds; a start that needs longer is broken.
L2_START_TIMEOUT = 60.0

# <linux/iommufd.h>: IOMMUFD_TYPE ';', IOMMU_IOAS_ALLOC = 0x81, IOMMU_OPTION = 0x87.
IOMMU_IOAS_ALLOC = 0x3B81
IOMMU_OPTION = 0x3B87
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_OP_SET, IOMMU_OPTION_OP_GET = 0, 1
SYS_PIDFD_GETFD = 438  # x86_64
# struct iommu_option {u32 size; u32 option_id; u16 op; u16 __reserved; u32 object_id;
# u64 val64}
_OPTION = struct.Struct("=IIHHIQ")


class Failed(Exception):
    """A scenario's fact does not hold; the message says which and shows the evidence."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise Failed(message)


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    func: Callable[[Bed], dict[str, Any]]
    doc: str


SCENARIOS: list[Scenario] = []


def scenario(func: Callable[[Bed], dict[str, Any]]) -> Callable[[Bed], dict[str, Any]]:
    """Register a scenario; the outer pytest makes one test per registered name."""
    SCENARIOS.append(Scenario(func.__name__, func, (func.__doc__ or "").strip()))
    return func


def scenario_names(stack: str = "base") -> list[str]:
    return [s.name for s in stack_scenarios(stack)]


# --------------------------------------------------------------------------- the bed


@dataclasses.dataclass(frozen=True)
class EduDevice:
    bdf: str
    driver: str | None
    group: str | None
    cdev: str | None  # /dev/vfio/devices/vfioN


def find_edu_devices(ids: tuple[str, str] = (EDU_VENDOR, EDU_DEVICE)) -> list[EduDevice]:
    found = []
    for dev in sorted(Path("/sys/bus/pci/devices").iterdir()):
        vendor = (dev / "vendor").read_text().strip()
        device = (dev / "device").read_text().strip()
        if (vendor, device) != ids:
            continue
        driver = os.readlink(dev / "driver") if (dev / "driver").exists() else None
        group = os.readlink(dev / "iommu_group") if (dev / "iommu_group").exists() else None
        vfio_dev = dev / "vfio-dev"
        cdevs = sorted(p.name for p in vfio_dev.iterdir()) if vfio_dev.is_dir() else []
        found.append(
            EduDevice(
                bdf=dev.name,
                driver=Path(driver).name if driver else None,
                group=Path(group).name if group else None,
                cdev=f"/dev/vfio/devices/{cdevs[0]}" if cdevs else None,
            )
        )
    return found


def bar2_size(bdf: str) -> int:
    """The size of a device's BAR2 (ivshmem-plain's shared memory), from sysfs resource."""
    start, end, _ = (
        int(f, 16) for f in Path(f"/sys/bus/pci/devices/{bdf}/resource").read_text().splitlines()[2].split()
    )
    return end - start + 1 if end > start else 0


@dataclasses.dataclass
class Bed:
    edu: list[EduDevice]
    log: list[str] = dataclasses.field(default_factory=list)
    # L1's ivshmem-plain devices (bed.BIG_BAR_DEVICES) by the size of their BAR2: 1 GiB, 1 TiB.
    big: dict[int, EduDevice] = dataclasses.field(default_factory=dict)

    def big_bar(self, size: int) -> EduDevice:
        check(size in self.big, f"L1 has no device with a BAR2 of {size} bytes: {self.big}")
        return self.big[size]

    def say(self, line: str) -> None:
        self.log.append(line)
        print(f"    {line}", flush=True)

    def cdevs(self, n: int) -> list[str]:
        usable = [d.cdev for d in self.edu if d.cdev]
        check(len(usable) >= n, f"need {n} edu devices with a vfio cdev, have {self.edu}")
        return usable[:n]

    def bdfs(self, n: int) -> list[str]:
        check(len(self.edu) >= n, f"need {n} edu devices, have {self.edu}")
        return [d.bdf for d in self.edu[:n]]


# --------------------------------------------------------------------------- QMP


class Qmp:
    """Just enough of a synchronous QMP client: commands and their replies, events skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        greeting = self._read()
        check("QMP" in greeting, f"QMP greeting expected, got {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise Failed(f"QMP {command} failed: {reply['error']}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def pci_qdev_ids(query_pci: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """qdev_id -> device entry, over all buses including those behind bridges."""
    out: dict[str, dict[str, Any]] = {}

    def walk(devices: list[dict[str, Any]]) -> None:
        for d in devices:
            if d.get("qdev_id"):
                out[d["qdev_id"]] = d
            bridge = d.get("pci_bridge")
            if bridge and "devices" in bridge:
                walk(bridge["devices"])

    for bus in query_pci:
        walk(bus.get("devices", []))
    return out


# --------------------------------------------------------------------------- launching L2


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the launcher (a forked child of this root process) starts an L2 QEMU."""

    argv: list[str]
    # Opened O_RDWR as root and placed at fds 3, 4, ... in this order.
    fds: list[str] = dataclasses.field(default_factory=list)
    user: str | None = USER
    memlock: int | None = None  # RLIMIT_MEMLOCK, soft = hard, bytes
    # IOMMU_OPTION RLIMIT_MODE=1 (per-process accounting) on every /dev/iommu fd.
    per_process_accounting: bool = False
    env: dict[str, str] | None = None  # None: this process's environment
    # Its own process group, killed as a whole: for commands that leave children (vmrun smoke).
    session: bool = False


def _launcher_child(spec: Launch, out_fd: int, err_fd: int) -> None:
    """Runs in the forked child; never returns (execs QEMU or _exits 126)."""
    try:
        if spec.session:
            os.setsid()
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        opened = [os.open(p, os.O_RDWR) for p in spec.fds]
        if spec.per_process_accounting:
            for fd, path in zip(opened, spec.fds, strict=True):
                if path == "/dev/iommu":
                    iommu_option(fd, IOMMU_OPTION_OP_SET, 1)
        # Park the fds high first: dup2 onto a number an fd already has is a no-op that
        # keeps it non-inheritable, so it would be closed at exec.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 512) for fd in opened]
        os.closerange(3, 512)
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i, inheritable=True)
            os.set_inheritable(3 + i, True)
        for fd in high:
            os.close(fd)
        if spec.memlock is not None:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (spec.memlock, spec.memlock))
        if spec.user is not None:
            pw = pwd.getpwnam(spec.user)
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        exe = shutil.which(spec.argv[0]) or spec.argv[0]
        os.execve(exe, spec.argv, os.environ if spec.env is None else spec.env)
    except BaseException:
        os.write(2, ("launcher: " + traceback.format_exc()).encode())
    os._exit(126)


class Vm:
    """A process started through the launcher that becomes QEMU and answers QMP at qmp_path."""

    def __init__(self, spec: Launch, qmp_path: str, workdir: Path) -> None:
        self.spec = spec
        self.qmp_path = qmp_path
        self.dir = workdir
        self.out_path = workdir / "stdout"
        self.err_path = workdir / "stderr"
        self.returncode: int | None = None
        self.qmp: Qmp | None = None
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            pid = os.fork()
            if pid == 0:
                _launcher_child(self.spec, out.fileno(), err.fileno())
        self.pid = pid

    @property
    def argv(self) -> list[str]:
        return self.spec.argv

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode

    def wait_qmp(self, timeout: float = L2_START_TIMEOUT) -> bool:
        """True once QMP answers (devices are realized by then); False if QEMU exited."""
        if self.qmp is not None:
            return True  # QEMU serves one QMP client at a time: this one
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return False
            if os.path.exists(self.qmp_path):
                try:
                    self.qmp = Qmp(self.qmp_path)
                    return True
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
                except ConnectionError:
                    # The socket exists from chardev creation on, before devices are
                    # realized; a failing realize makes QEMU drop the connection and exit.
                    if self.wait(15.0) is not None:
                        return False
                    raise
            time.sleep(0.02)
        self.kill()
        raise Failed(f"{self.argv[0]} neither exited nor answered QMP in {timeout}s\n{self.describe()}")

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return (
            f"pid {self.pid} argv: {' '.join(self.argv)}\n"
            f"fds: {self.spec.fds} user: {self.spec.user} "
            f"memlock: {self.spec.memlock}\nexit: {self.returncode}\nstderr:\n{self.stderr()}"
        )

    def quit(self) -> int | None:
        if self.poll() is None:
            if self.qmp is not None:
                with contextlib.suppress(OSError, ConnectionError, Failed):
                    self.qmp.execute("quit")
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
        if self.wait(15.0) is None:
            self.kill()
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.spec.session:
                    os.killpg(self.pid, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            self.wait(10.0)

    def release_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def close(self) -> None:
        self.quit()
        if self.qmp is not None:
            self.qmp.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def private_dir(prefix: str, user: str | None) -> Path:
    """A dir under /run that only `user` (and root) can write: nobody else plants sockets."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/run"))
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o700)
    return path


class L2(Vm):
    """A raw L2 QEMU: paused, no default devices, QMP on a unix socket it creates itself."""

    def __init__(self, spec: Launch, extra_args: Sequence[str] = ()) -> None:
        workdir = private_dir("l2-", spec.user)
        qmp_path = str(workdir / "qmp.sock")
        argv = [
            *spec.argv,
            "-machine", "q35",
            "-accel", "tcg",
            "-m", f"{L2_RAM_MIB}M",
            "-nodefaults",
            "-display", "none",
            "-S",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            *extra_args,
        ]  # fmt: skip
        super().__init__(dataclasses.replace(spec, argv=argv), qmp_path, workdir)


@contextlib.contextmanager
def l2(spec: Launch, extra_args: Sequence[str] = ()) -> Iterator[L2]:
    proc = L2(spec, extra_args)
    try:
        yield proc
    finally:
        proc.close()


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_fd_targets(pid: int) -> dict[int, str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return {int(p.name): os.readlink(p) for p in fd_dir.iterdir()}


def check_deprivileged(proc: Vm, user: str, expected_fds: dict[int, str]) -> dict[str, Any]:
    """The facts every de-privileged launch must show; returns what was seen."""
    pw = pwd.getpwnam(user)
    status = proc_status(proc.pid)
    ids = f"{pw.pw_uid}\t{pw.pw_uid}\t{pw.pw_uid}\t{pw.pw_uid}"
    check(status["Uid"] == ids, f"Uid of L2 is {status['Uid']!r}, expected all {pw.pw_uid}")
    gids = f"{pw.pw_gid}\t{pw.pw_gid}\t{pw.pw_gid}\t{pw.pw_gid}"
    check(status["Gid"] == gids, f"Gid of L2 is {status['Gid']!r}, expected all {pw.pw_gid}")
    for cap in ("CapEff", "CapPrm"):
        check(int(status[cap], 16) == 0, f"{cap} of L2 is {status[cap]}, expected 0")
    fds = proc_fd_targets(proc.pid)
    for fd, path in expected_fds.items():
        check(
            fds.get(fd) == path,
            f"fd {fd} of L2 points to {fds.get(fd)!r}, expected {path!r}; all fds: {fds}",
        )
    return {
        "Uid": status["Uid"],
        "Gid": status["Gid"],
        "Groups": status["Groups"],
        "CapEff": status["CapEff"],
        "VmLck": status.get("VmLck"),
        "VmPin": status.get("VmPin"),
        "fds": {str(k): v for k, v in sorted(fds.items())},
    }


def require_started(proc: Vm, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """L2 must answer QMP and show every vfio device in query-pci, by its id."""
    check(proc.wait_qmp(), f"L2 did not start\n{proc.describe()}")
    assert proc.qmp is not None
    devices = pci_qdev_ids(proc.qmp.execute("query-pci"))
    missing = [i for i in ids if i not in devices]
    check(not missing, f"query-pci lacks {missing}; has {sorted(devices)}\n{proc.describe()}")
    return {i: devices[i] for i in ids}


def device(spec: str) -> list[str]:
    return ["-device", spec]


def iommufd_args(n_objects: int) -> list[str]:
    args = []
    for i in range(n_objects):
        args += ["-object", f"iommufd,id=iommufd{i},fd={3 + i}"]
    return args


def starts(spec: Launch, ids: Sequence[str]) -> tuple[bool, str]:
    """Does L2 start with this launch and realize the devices? (stderr when it did not)"""
    with l2(spec) as proc:
        if not proc.wait_qmp():
            return False, proc.stderr()
        assert proc.qmp is not None
        devices = pci_qdev_ids(proc.qmp.execute("query-pci"))
        missing = [i for i in ids if i not in devices]
        # Started without the devices would be a different bug: say so, do not bisect on.
        check(not missing, f"L2 started without {missing}\n{proc.describe()}")
        return True, ""


# --------------------------------------------------------------------------- ioctls


def iommu_option(fd: int, op: int, val: int = 0) -> int:
    buf = bytearray(_OPTION.pack(_OPTION.size, IOMMU_OPTION_RLIMIT_MODE, op, 0, 0, val))
    fcntl.ioctl(fd, IOMMU_OPTION, buf)
    value: int = _OPTION.unpack(buf)[5]
    return value


def accounting_mode_of(pid: int, fd: int) -> int:
    """IOMMU_OPTION RLIMIT_MODE of another process's iommufd (the same open file, not a
    fresh open of /dev/iommu, which would be a new context)."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    try:
        return iommu_option(dup, IOMMU_OPTION_OP_GET)
    finally:
        os.close(dup)


def ioas_alloc(fd: int) -> int:
    # struct iommu_ioas_alloc {u32 size; u32 flags; u32 out_ioas_id}
    buf = bytearray(struct.pack("=III", 12, 0, 0))
    fcntl.ioctl(fd, IOMMU_IOAS_ALLOC, buf)
    ioas_id: int = struct.unpack("=III", buf)[2]
    return ioas_id


def errno_in_child(user: str, action: Callable[[], object]) -> int:
    """Run action as `user` in a forked child; its errno (0 = success)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            pw = pwd.getpwnam(user)
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            action()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --------------------------------------------------------------------------- scenarios


@scenario
def bed_sanity(bed: Bed) -> dict[str, Any]:
    """/dev/iommu and five vfio cdevs exist; every edu device (two on pcie.0, one on NUMA
    node 1) and both big-BAR devices (1 GiB and 1 TiB) are bound to vfio-pci, the edu devices
    first (vfio0-2: they keep the numbers scenarios had before the big-BAR devices came)."""
    check(Path("/dev/iommu").is_char_device(), "/dev/iommu is missing or not a char device")
    cdevs = sorted(str(p) for p in Path("/dev/vfio/devices").glob("vfio*"))
    check(len(cdevs) == 5, f"expected 5 vfio cdevs in /dev/vfio/devices, found {cdevs}")
    check(len(bed.edu) == 3, f"expected 3 edu devices, found {bed.edu}")
    check(sorted(bed.big) == [GIB, 1 << 40], f"expected BARs of 1 GiB and 1 TiB, found {bed.big}")
    check(numa_edu(bed) == bed.edu[2], f"the edu device on node {NUMA_NODE} must sort last: {bed.edu}")
    check({d.cdev for d in bed.edu} == set(cdevs[:3]), f"the edu devices' cdevs are not vfio0-2: {bed.edu}")
    for d in [*bed.edu, *bed.big.values()]:
        check(d.driver == "vfio-pci", f"edu {d.bdf} is bound to {d.driver}, not vfio-pci")
        check(d.group is not None, f"edu {d.bdf} has no iommu_group (is the vIOMMU on?)")
        check(d.cdev in cdevs, f"edu {d.bdf}: cdev {d.cdev} not among {cdevs}")
        check(
            Path(f"/dev/vfio/{d.group}").is_char_device(),
            f"group node /dev/vfio/{d.group} of {d.bdf} is missing",
        )
    check(Path("/dev/vfio/vfio").is_char_device(), "legacy container /dev/vfio/vfio is missing")
    return {
        "edu": [dataclasses.asdict(d) for d in bed.edu],
        "big": {n: dataclasses.asdict(d) for n, d in bed.big.items()},
    }


@scenario
def fd_passing_deprivileged(bed: Bed) -> dict[str, Any]:
    """Root opens /dev/iommu + both cdevs, passes them as fds 3-5 to QEMU running as nobody."""
    cdevs = bed.cdevs(2)
    spec = Launch(
        argv=[
            QEMU,
            *iommufd_args(1),
            *device("vfio-pci,id=dev0,fd=4,iommufd=iommufd0"),
            *device("vfio-pci,id=dev1,fd=5,iommufd=iommufd0"),
        ],
        fds=["/dev/iommu", *cdevs],
        memlock=1024 * MIB,
    )
    with l2(spec) as proc:
        devices = require_started(proc, ["dev0", "dev1"])
        seen = check_deprivileged(proc, USER, {3: "/dev/iommu", 4: cdevs[0], 5: cdevs[1]})
        # The launcher did not ask for per-process accounting: the default must show.
        mode = accounting_mode_of(proc.pid, 3)
        check(mode == 0, f"QEMU's iommufd reports accounting mode {mode}, expected 0")
        qmp = proc.qmp
        assert qmp is not None
        qmp.execute("quit")
        rc = proc.wait(15.0)
        check(rc == 0, f"L2 did not exit cleanly after quit: {rc}\n{proc.describe()}")
    return {"process": seen, "pci": {k: v.get("slot") for k, v in devices.items()}}


@scenario
def host_bdf_deprivileged_fails(bed: Bed) -> dict[str, Any]:
    """host= makes QEMU open the cdev itself: as nobody that must fail, as root it works."""
    bdf = bed.bdfs(1)[0]
    cdev = bed.cdevs(1)[0]
    argv = [QEMU, *iommufd_args(1), "-device", f"vfio-pci,id=dev0,host={bdf},iommufd=iommufd0"]
    spec = Launch(argv=argv, fds=["/dev/iommu"], memlock=1024 * MIB)
    with l2(spec) as proc:
        check(
            not proc.wait_qmp(),
            f"QEMU as {USER} opened {cdev} on its own: the cdev is not root-only?\n" + proc.describe(),
        )
        err = proc.stderr()
        check(proc.returncode not in (0, None), f"QEMU exited with 0\n{proc.describe()}")
        check(cdev in err, f"the error does not name the cdev {cdev}\n{proc.describe()}")
    # Control: the very same command line as root starts, so the failure above is the
    # de-privileging and not a wrong argument.
    with l2(dataclasses.replace(spec, user=None)) as root_proc:
        require_started(root_proc, ["dev0"])
    return {"error": err.strip()}


@dataclasses.dataclass(frozen=True)
class MemlockSetup:
    address_spaces: int
    launch: Callable[[Bed], Launch]
    # The same setup as a vmrun config: each device's [[iommufd]] object, None for legacy.
    device_objects: tuple[str | None, ...]
    # dev1 is the device with a 1 GiB BAR (ivshmem-plain) instead of the second edu device.
    big_bar: bool = False

    def vmrun_config(self, bed: Bed, name: str) -> str:
        bdfs = bed.bdfs(len(self.device_objects))
        if self.big_bar:
            bdfs = [bdfs[0], bed.big_bar(GIB).bdf]
        objects = dict.fromkeys(o for o in self.device_objects if o is not None)
        vfio: list[Mapping[str, object]] = []
        for i, (bdf, obj) in enumerate(zip(bdfs, self.device_objects, strict=True)):
            vfio.append({"id": f"dev{i}", "host": bdf} | ({"iommufd": obj} if obj else {}))
        return vmrun_config(name, vfio=vfio, iommufd=[{"id": o} for o in objects])


MEMLOCK_SETUPS: dict[str, MemlockSetup] = {}


def memlock_setup(
    name: str, address_spaces: int, device_objects: tuple[str | None, ...], big_bar: bool = False
) -> Callable[[Callable[[Bed], Launch]], Callable[[Bed], Launch]]:
    def register(make: Callable[[Bed], Launch]) -> Callable[[Bed], Launch]:
        MEMLOCK_SETUPS[name] = MemlockSetup(address_spaces, make, device_objects, big_bar)
        return make

    return register


@memlock_setup("iommufd, one shared object, 2 devices", 1, ("iommufd0", "iommufd0"))
def _shared_iommufd(bed: Bed) -> Launch:
    cdevs = bed.cdevs(2)
    return Launch(
        argv=[
            QEMU,
            *iommufd_args(1),
            *device("vfio-pci,id=dev0,fd=4,iommufd=iommufd0"),
            *device("vfio-pci,id=dev1,fd=5,iommufd=iommufd0"),
        ],
        fds=["/dev/iommu", *cdevs],
    )


@memlock_setup("iommufd, two objects, one device each", 2, ("iommufd0", "iommufd1"))
def _two_iommufds(bed: Bed) -> Launch:
    cdevs = bed.cdevs(2)
    return Launch(
        argv=[
            QEMU,
            *iommufd_args(2),
            *device("vfio-pci,id=dev0,fd=5,iommufd=iommufd0"),
            *device("vfio-pci,id=dev1,fd=6,iommufd=iommufd1"),
        ],
        fds=["/dev/iommu", "/dev/iommu", *cdevs],
    )


@memlock_setup("legacy type1, 2 devices", 1, (None, None))
def _legacy(bed: Bed) -> Launch:
    bdfs = bed.bdfs(2)
    return Launch(
        argv=[
            QEMU,
            *device(f"vfio-pci,id=dev0,host={bdfs[0]}"),
            *device(f"vfio-pci,id=dev1,host={bdfs[1]}"),
        ],
    )


@memlock_setup("iommufd, one shared object, an edu and a 1 GiB-BAR device", 1, ("iommufd0", "iommufd0"), True)
def _shared_iommufd_big_bar(bed: Bed) -> Launch:
    cdev = bed.big_bar(GIB).cdev
    check(cdev is not None, f"the 1 GiB-BAR device has no vfio cdev: {bed.big}")
    return Launch(
        argv=[
            QEMU,
            *iommufd_args(1),
            *device("vfio-pci,id=dev0,fd=4,iommufd=iommufd0"),
            *device("vfio-pci,id=dev1,fd=5,iommufd=iommufd0"),
        ],
        fds=["/dev/iommu", bed.cdevs(1)[0], str(cdev)],
    )


@memlock_setup("legacy type1, an edu and a 1 GiB-BAR device", 1, (None, None), True)
def _legacy_big_bar(bed: Bed) -> Launch:
    return Launch(
        argv=[
            QEMU,
            # As vmrun plans it on L1's 39-bit vIOMMU: the firmware then puts the BAR where the
            # IOMMU reaches, and type1 maps it (peer-to-peer DMA) as it would on a host.
            "-cpu", "qemu64,phys-bits=39",
            *device(f"vfio-pci,id=dev0,host={bed.bdfs(1)[0]}"),
            *device(f"vfio-pci,id=dev1,host={bed.big_bar(GIB).bdf}"),
        ],
    )  # fmt: skip


@contextlib.contextmanager
def groups_owned_by(bed: Bed, user: str) -> Iterator[None]:
    """Legacy VFIO needs the group nodes; hand them to `user` (L1's /dev is ours to change).

    Running legacy as root instead would measure nothing: CAP_IPC_LOCK skips accounting.
    """
    pw = pwd.getpwnam(user)
    nodes = [Path(f"/dev/vfio/{d.group}") for d in [*bed.edu, *bed.big.values()] if d.group]
    saved = {n: n.stat() for n in nodes}
    try:
        for n in nodes:
            os.chown(n, pw.pw_uid, pw.pw_gid)
        yield
    finally:
        for n, st in saved.items():
            os.chown(n, st.st_uid, st.st_gid)


def bisect_memlock(
    bed: Bed, spec: Launch, guess: tuple[int, int] | None = None, floor_mib: int = 1, ceiling_mib: int = 1024
) -> dict[str, Any]:
    """Smallest RLIMIT_MEMLOCK (MiB) in [floor, ceiling] with which L2 starts and realizes
    dev0 and dev1.

    `guess` (fails, starts) only orders the probes: when the need lies between them the
    search takes a few probes less (each is an L2 start, ~1 s); when it does not, the
    search goes on below or above, so a wrong guess costs probes, never the answer.
    """
    ids = ["dev0", "dev1"]
    probes: list[tuple[int, bool]] = []
    last_err = [""]

    def ok(mib: int) -> bool:
        t = time.monotonic()
        good, err = starts(dataclasses.replace(spec, memlock=mib * MIB), ids)
        probes.append((mib, good))
        bed.say(f"memlock {mib} MiB: {'starts' if good else 'fails'} ({time.monotonic() - t:.1f}s)")
        if not good:
            last_err[0] = err
        return good

    lo, hi = guess or (floor_mib, ceiling_mib)
    # good: smallest value known to start; bad: largest known to fail (floor - 1: none yet).
    if ok(hi):
        good, bad = hi, floor_mib - 1
    else:
        check(
            hi < ceiling_mib and ok(ceiling_mib),
            f"L2 does not start even with {ceiling_mib} MiB:\n{last_err[0]}",
        )
        good, bad = ceiling_mib, hi
    if bad < lo < good:
        if ok(lo):
            good = lo
        else:
            bad = lo
    if bad < floor_mib < good:
        if ok(floor_mib):
            return {"need_mib": floor_mib, "probes": probes, "error_below": None}
        bad = floor_mib
    while good - bad > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    # Failures only ever raise `bad`, so the latest one is the probe just below the need:
    # what QEMU says there.
    return {"need_mib": good, "probes": probes, "error_below": last_err[0].strip()[-600:]}


@scenario
def memlock_bisect(bed: Bed) -> dict[str, Any]:
    """Smallest RLIMIT_MEMLOCK that starts L2 (256 MiB RAM) per backend setup; vmrun's
    memlock=auto for the same setup must cover it by at most its margin, and start it."""
    table: dict[str, Any] = {}
    compared: dict[str, tuple[int, float]] = {}
    for name, setup in MEMLOCK_SETUPS.items():
        bed.say(f"bisecting: {name}")
        spec = setup.launch(bed)
        spaces = setup.address_spaces
        # Legacy QEMU opens the group files itself: as nobody it needs them (see groups_owned_by).
        ctx = groups_owned_by(bed, USER) if not spec.fds else contextlib.nullcontext()
        with ctx:
            # Measured so far: guest RAM x address spaces + 1 MiB (ROMs). A guess that brackets
            # it tightly takes 4 starts instead of 8; a need outside it costs starts, never the answer.
            found = bisect_memlock(bed, spec, guess=(spaces * L2_RAM_MIB, spaces * L2_RAM_MIB + 4))
            found["address_spaces"] = spaces
            table[name] = found
            # End to end: vmrun computes the limit for the same devices and backend, sets it,
            # runs QEMU as nobody, and QEMU must realize both devices with it.
            vm_name = "e2e-memlock-" + ("legacy" if None in setup.device_objects else f"{spaces}obj")
            vm_name += "-bar" if setup.big_bar else ""
            with vmrun_vm(vm_name, setup.vmrun_config(bed, vm_name)) as vm:
                auto = vm.plan["memlock_bytes"]
                check(auto is not None, f"{name}: vmrun plans no memlock limit: {vm.plan['memlock']}")
                need = found["need_mib"]
                compared[name] = (need, auto / MIB)
                bed.say(f"{name}: need {need} MiB, vmrun auto {auto / MIB:g} MiB")
                check(
                    need * MIB <= auto <= (need + VMRUN_MEMLOCK_MARGIN_MIB) * MIB,
                    f"{name}: vmrun's memlock=auto is {auto / MIB:g} MiB, the measured need {need} MiB; "
                    f"it must cover the need by at most its {VMRUN_MEMLOCK_MARGIN_MIB} MiB margin "
                    f"({vm.plan['memlock']['derivation']})",
                )
                check_as_planned(vm, ["dev0", "dev1"])
    summary = {name: row["need_mib"] for name, row in table.items()}
    bed.say(f"memlock table (MiB): {summary}")
    for name, row in table.items():
        need, spaces = row["need_mib"], row["address_spaces"]
        # The need must follow guest RAM x DMA address spaces (+ a little for ROMs): that
        # is the model vmrun's memlock=auto computes from.
        check(
            spaces * L2_RAM_MIB < need <= spaces * L2_RAM_MIB + 64,
            f"{name}: needs {need} MiB, expected just above {spaces} x {L2_RAM_MIB} MiB "
            f"RAM; table: {summary}; QEMU below the need said:\n{row['error_below']}",
        )
    return {"table_mib": summary, "need_vs_vmrun_auto_mib": compared, "details": table}


@scenario
def iommu_option_rlimit_mode(bed: Bed) -> dict[str, Any]:
    """IOMMU_OPTION RLIMIT_MODE: fresh fd is per-user (0); root can SET per-process (1)."""
    fd = os.open("/dev/iommu", os.O_RDWR)
    try:
        fresh = iommu_option(fd, IOMMU_OPTION_OP_GET)
        check(fresh == 0, f"a fresh /dev/iommu fd reports RLIMIT_MODE {fresh}, expected 0")
        # Unprivileged (no CAP_SYS_RESOURCE) SET must be refused on the same context.
        as_user = errno_in_child(USER, lambda: iommu_option(fd, IOMMU_OPTION_OP_SET, 1))
        check(
            as_user == errno.EPERM,
            f"SET as {USER} gave errno {as_user} ({os.strerror(as_user)}), expected EPERM",
        )
        iommu_option(fd, IOMMU_OPTION_OP_SET, 1)
        after = iommu_option(fd, IOMMU_OPTION_OP_GET)
        check(after == 1, f"after SET 1 as root, GET reports {after}")
    finally:
        os.close(fd)
    # Once the context owns an object the mode is frozen: the launcher must set it first.
    fd = os.open("/dev/iommu", os.O_RDWR)
    try:
        ioas = ioas_alloc(fd)
        try:
            iommu_option(fd, IOMMU_OPTION_OP_SET, 1)
            busy = 0
        except OSError as e:
            busy = e.errno or 0
        check(busy == errno.EBUSY, f"SET after IOAS_ALLOC gave errno {busy}, expected EBUSY")
    finally:
        os.close(fd)
    return {"fresh": fresh, "after_set": after, "set_as_user_errno": "EPERM", "ioas": ioas}


@scenario
def accounting_two_vms_one_uid(bed: Bed) -> dict[str, Any]:
    """Two VMs of one uid, 1 device each, memlock 300 MiB: per-user collides, per-process not."""
    cdevs = bed.cdevs(2)

    def spec(i: int, per_process: bool) -> Launch:
        return Launch(
            argv=[QEMU, *iommufd_args(1), "-device", "vfio-pci,id=dev0,fd=4,iommufd=iommufd0"],
            fds=["/dev/iommu", cdevs[i]],
            memlock=300 * MIB,
            per_process_accounting=per_process,
        )

    with l2(spec(0, False)) as first:
        require_started(first, ["dev0"])
        with l2(spec(1, False)) as second:
            check(
                not second.wait_qmp(),
                "per-user accounting: the second VM of the same uid started although both "
                "together pin more than the 300 MiB limit\n" + second.describe(),
            )
            collision = second.stderr().strip()
    with l2(spec(0, True)) as first, l2(spec(1, True)) as second:
        require_started(first, ["dev0"])
        require_started(second, ["dev0"])
        for vm in (first, second):
            mode = accounting_mode_of(vm.pid, 3)
            check(mode == 1, f"pid {vm.pid}: iommufd accounting mode {mode}, expected 1")
    return {"per_user_second_vm_error": collision[-600:]}


# --------------------------------------------------------------------------- vmrun


def vmrun_available() -> str | None:
    """Why the vmrun scenarios cannot run, or None."""
    if not os.access(VMRUN, os.X_OK):
        return f"{VMRUN} does not exist (install the package into .venv)"
    return None


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def vmrun_config(
    name: str,
    vfio: Sequence[Mapping[str, object]],
    iommufd: Sequence[Mapping[str, object]] = ({"id": "iommufd0"},),
    **vm: object,
) -> str:
    """A TOML config for an L2 like the raw scenarios' (256 MiB, q35, tcg, as nobody)."""
    settings: dict[str, object] = {
        "name": name,
        "memory": f"{L2_RAM_MIB}M",
        "cpus": 1,
        "machine": "q35",
        "accel": "tcg",
        "qemu": QEMU,
        "user": USER,
        "memlock": "auto",
        "console": "none",
    }
    settings.update(vm)
    lines = ["[vm]", *(f"{k} = {toml_value(v)}" for k, v in settings.items() if v is not None)]
    for table, entries in (("iommufd", iommufd), ("vfio", vfio)):
        for entry in entries:
            lines += ["", f"[[{table}]]", *(f"{k} = {toml_value(v)}" for k, v in entry.items())]
    return "\n".join(lines) + "\n"


class VmrunVm(Vm):
    """`vmrun run --paused CONFIG`, started as root by the launcher; vmrun execs QEMU,
    so the launched pid becomes QEMU's. QMP is vmrun's own socket in its state dir."""

    def __init__(self, name: str, config: str, caller_fds: Sequence[str] = ()) -> None:
        workdir = private_dir(f"vmrun-{name}-", None)
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.state = workdir / "state"
        self.state.mkdir()
        self.env = {**os.environ, "VMRUN_STATE_DIR": str(self.state)}
        spec = Launch(
            argv=[str(VMRUN), "run", "--paused", str(self.config_path)],
            fds=list(caller_fds),
            user=None,
            env=self.env,
        )
        self.plan = self.vmrun("plan", "--json", str(self.config_path))
        super().__init__(spec, str(self.state / name / "qmp.sock"), workdir)

    def vmrun(self, *args: str, check_rc: bool = True) -> Any:
        """Run another vmrun command against this VM; its JSON output, or the process."""
        proc = subprocess.run([str(VMRUN), *args], env=self.env, capture_output=True, text=True, timeout=60)
        if not check_rc:
            return proc
        check(
            proc.returncode == 0,
            f"vmrun {' '.join(args)} exited {proc.returncode}\nconfig:\n"
            f"{self.config_path.read_text()}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
        )
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def describe(self) -> str:
        return f"{super().describe()}config:\n{self.config_path.read_text()}"


@contextlib.contextmanager
def vmrun_vm(name: str, config: str, caller_fds: Sequence[str] = ()) -> Iterator[VmrunVm]:
    why = vmrun_available()
    check(why is None, str(why))
    vm = VmrunVm(name, config, caller_fds)
    try:
        yield vm
    finally:
        vm.close()


def check_as_planned(vm: VmrunVm, ids: Sequence[str], caller_fds: Sequence[str] = ()) -> dict[str, Any]:
    """The running QEMU is what `vmrun plan --json` promised: argv, fds, memlock, user,
    accounting mode; and it realized every device."""
    plan = vm.plan
    check(not plan["problems"], f"vmrun plan reports problems: {plan['problems']}")
    devices = require_started(vm, ids)
    cmdline = Path(f"/proc/{vm.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    check(
        "-S" in cmdline and [a for a in cmdline if a != "-S"] == plan["argv"],
        f"QEMU's command line is not the planned one (+ -S)\nplanned: {plan['argv']}\nrunning: {cmdline}",
    )
    expected = {f["fd"]: f["path"] for f in plan["fds"] if f["kind"] == "device"}
    expected.update({3 + i: path for i, path in enumerate(caller_fds)})
    run_as = plan["run_as"]
    check(run_as is not None and run_as["user"] == USER, f"plan runs QEMU as {run_as}")
    seen = check_deprivileged(vm, USER, expected)
    limit = memlock_limit(vm.pid)
    check(
        limit == plan["memlock_bytes"],
        f"QEMU's RLIMIT_MEMLOCK is {limit}, the plan says {plan['memlock_bytes']}",
    )
    modes = {}
    for f in plan["fds"]:
        if f["per_process_accounting"]:
            modes[f["fd"]] = accounting_mode_of(vm.pid, f["fd"])
            check(
                modes[f["fd"]] == 1,
                f"fd {f['fd']} ({f['path']}): accounting mode {modes[f['fd']]}, the plan promised per-process (1)",
            )
    return {
        "process": seen,
        "memlock_bytes": limit,
        "accounting_modes": modes,
        "pci": sorted(devices),
        "argv": cmdline,
    }


def memlock_limit(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max locked memory"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise Failed(f"/proc/{pid}/limits has no 'Max locked memory' line")


@scenario
def vmrun_run_deprivileged(bed: Bed) -> dict[str, Any]:
    """vmrun opens /dev/iommu and both cdevs (host=, sysfsdev=), QEMU runs as nobody."""
    bdfs = bed.bdfs(2)
    config = vmrun_config(
        "e2e-deprivileged",
        vfio=[
            {"id": "dev0", "host": bdfs[0], "iommufd": "iommufd0"},
            {"id": "dev1", "sysfsdev": f"/sys/bus/pci/devices/{bdfs[1]}", "iommufd": "iommufd0"},
        ],
    )
    with vmrun_vm("e2e-deprivileged", config) as vm:
        need = (L2_RAM_MIB + 1) * MIB  # measured by memlock_bisect for this setup
        planned = vm.plan["memlock_bytes"]
        check(
            planned is not None and planned >= need,
            f"memlock auto plans {planned} bytes, below the measured need {need}",
        )
        seen = check_as_planned(vm, ["dev0", "dev1"])
    return seen


@scenario
def vmrun_caller_fds(bed: Bed) -> dict[str, Any]:
    """The caller passes /dev/iommu and one cdev at fds 3 and 4; vmrun keeps their numbers."""
    bdfs = bed.bdfs(2)
    cdevs = bed.cdevs(2)
    config = vmrun_config(
        "e2e-caller-fds",
        iommufd=[{"id": "iommufd0", "fd": 3}],
        vfio=[
            {"id": "dev0", "fd": 4, "iommufd": "iommufd0"},
            {"id": "dev1", "sysfsdev": f"/sys/bus/pci/devices/{bdfs[1]}", "iommufd": "iommufd0"},
        ],
    )
    caller = ["/dev/iommu", cdevs[0]]
    with vmrun_vm("e2e-caller-fds", config, caller_fds=caller) as vm:
        seen = check_as_planned(vm, ["dev0", "dev1"], caller_fds=caller)
        fds = seen["process"]["fds"]
        check(
            cdevs[1] in fds.values(),
            f"QEMU does not hold dev1's cdev {cdevs[1]}; its fds: {fds}",
        )
    return seen


@scenario
def vmrun_two_vms_one_uid(bed: Bed) -> dict[str, Any]:
    """Two vmrun VMs of one uid at 300 MiB each: vmrun's per-process accounting lets both
    start where per-user accounting fails (see accounting_two_vms_one_uid)."""
    bdfs = bed.bdfs(2)

    def config(name: str, bdf: str) -> str:
        return vmrun_config(name, vfio=[{"id": "dev0", "host": bdf, "iommufd": "iommufd0"}], memlock="300M")

    with (
        vmrun_vm("e2e-a", config("e2e-a", bdfs[0])) as a,
        vmrun_vm("e2e-b", config("e2e-b", bdfs[1])) as b,
    ):
        seen_a = check_as_planned(a, ["dev0"])
        seen_b = check_as_planned(b, ["dev0"])
        check(
            seen_a["accounting_modes"] and seen_b["accounting_modes"],
            "vmrun planned no per-process accounting on any /dev/iommu fd",
        )
    return {"a": seen_a["accounting_modes"], "b": seen_b["accounting_modes"]}


@scenario
def vmrun_lifecycle(bed: Bed) -> dict[str, Any]:
    """vmrun ps / qmp / stop on a running VM."""
    bdf = bed.bdfs(1)[0]
    name = "e2e-lifecycle"
    config = vmrun_config(name, vfio=[{"id": "dev0", "host": bdf, "iommufd": "iommufd0"}])
    with vmrun_vm(name, config) as vm:
        require_started(vm, ["dev0"])
        # QEMU serves one QMP client at a time: let go so vmrun's commands get through.
        vm.release_qmp()
        ps = vm.vmrun("ps", "--json")
        check(name in json.dumps(ps), f"vmrun ps --json does not list {name}: {ps}")
        pci = vm.vmrun("qmp", name, "query-pci")
        check("dev0" in pci_qdev_ids(pci), f"vmrun qmp {name} query-pci lacks dev0: {pci}")
        # QEMU is paused, the guest cannot react to the power button: stop must escalate.
        # QEMU is our child: reap it while stop runs, as a real parent (systemd) would, or
        # it lingers as a zombie that stop may rightly count as still there.
        stop = subprocess.Popen(
            [str(VMRUN), "stop", name, "--timeout", "6"],
            env=vm.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while stop.poll() is None and time.monotonic() < deadline:
            vm.poll()
            time.sleep(0.05)
        if stop.poll() is None:
            stop.kill()
        out = stop.communicate()[0]
        check(stop.returncode == 0, f"vmrun stop exited {stop.returncode}\n{out}")
        rc = vm.wait(10.0)
        check(rc is not None, f"QEMU (pid {vm.pid}) still runs after vmrun stop\n{out}")
    return {"ps": ps, "stop": out.strip().splitlines(), "qemu_exit": rc}


@scenario
def vmrun_smoke(bed: Bed) -> dict[str, Any]:
    """`vmrun smoke` (the CI check) passes on a good config and fails on a broken one."""
    why = vmrun_available()
    check(why is None, str(why))
    bdfs = bed.bdfs(2)
    workdir = private_dir("smoke-", None)
    try:
        good = workdir / "good.toml"
        good.write_text(
            vmrun_config(
                "e2e-smoke",
                vfio=[{"id": "dev0", "host": bdfs[0], "iommufd": "iommufd0"}],
            )
        )
        # memlock far below the pinning need: QEMU fails to realize the device.
        bad = workdir / "bad.toml"
        bad.write_text(
            vmrun_config(
                "e2e-smoke-bad",
                vfio=[{"id": "dev0", "host": bdfs[1], "iommufd": "iommufd0"}],
                memlock="8M",
            )
        )
        env = {**os.environ, "VMRUN_STATE_DIR": str(workdir / "state")}
        results = {}
        for cfg, want_ok in ((good, True), (bad, False)):
            junit = workdir / f"{cfg.stem}.xml"
            proc = subprocess.run(
                [str(VMRUN), "smoke", "--junit", str(junit), "--timeout", "60", str(cfg)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            out = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            check(
                (proc.returncode == 0) == want_ok,
                f"vmrun smoke {cfg.name} exited {proc.returncode}, expected {'0' if want_ok else 'non-zero'}\n{out}",
            )
            check(junit.exists(), f"vmrun smoke wrote no {junit.name}\n{out}")
            xml = junit.read_text()
            check(
                ("<failure" in xml or "<error" in xml) != want_ok,
                f"JUnit report of {cfg.name} does not say {'pass' if want_ok else 'fail'}:\n{xml}",
            )
            results[cfg.name] = proc.stdout.strip().splitlines()
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@scenario
def vmrun_legacy_as_root(bed: Bed) -> dict[str, Any]:
    """No [[iommufd]]: the legacy container backend, QEMU as root opens /dev/vfio itself."""
    bdfs = bed.bdfs(2)
    groups = [d.group for d in bed.edu[:2]]
    config = vmrun_config(
        "e2e-legacy",
        iommufd=[],
        vfio=[{"id": "dev0", "host": bdfs[0]}, {"id": "dev1", "host": bdfs[1]}],
        user=None,
    )
    with vmrun_vm("e2e-legacy", config) as vm:
        check(vm.plan["run_as"] is None, f"plan runs QEMU as {vm.plan['run_as']}, not as root")
        require_started(vm, ["dev0", "dev1"])
        fds = proc_fd_targets(vm.pid)
        wanted = ["/dev/vfio/vfio", *(f"/dev/vfio/{g}" for g in groups)]
        missing = [p for p in wanted if p not in fds.values()]
        check(not missing, f"legacy QEMU does not hold {missing}; its fds: {fds}")
        check(
            "/dev/iommu" not in fds.values(),
            f"legacy QEMU holds /dev/iommu: the iommufd backend was used; fds: {fds}",
        )
    return {"fds": {str(k): v for k, v in sorted(fds.items())}}


# --------------------------------------------------------------------------- vmrun, host side

# vmrun.bind.STATE_DIR: the drivers `vmrun bind` remembers, one file per device.
BIND_RECORDS = Path("/run/vmrun/bind")
IOMMU_AWAY = "/dev/iommu.away"
CONFIGS = CHECKOUT / "configs"


def qemu_processes(guest: str | None = None) -> dict[int, str]:
    """Live QEMU processes (all, or those of `-name guest=GUEST`): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone meanwhile
        # A zombie has an empty command line: it holds nothing any more.
        if not argv[0] or not Path(argv[0]).name.startswith("qemu-system"):
            continue
        if guest is None or f"guest={guest}" in argv:
            found[int(entry.name)] = " ".join(argv).strip()[:300]
    return found


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def edu_device(bdf: str) -> EduDevice:
    found = {d.bdf: d for d in find_edu_devices()}
    check(bdf in found, f"edu device {bdf} has gone from the PCI bus: {sorted(found)}")
    return found[bdf]


def bind_vfio_pci_by_sysfs(bdf: str) -> None:
    """Bind as l1-init does, without vmrun: the restore path must not depend on the code
    under test."""
    dev = Path("/sys/bus/pci/devices") / bdf
    (dev / "driver_override").write_text("vfio-pci")
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    Path("/sys/bus/pci/drivers_probe").write_text(bdf)
    wait_until(lambda: edu_device(bdf).cdev is not None and Path(str(edu_device(bdf).cdev)).exists(), 5.0)


@contextlib.contextmanager
def edu_bindings_restored() -> Iterator[None]:
    """Whatever the body does to the edu devices' drivers, they end on vfio-pci with their
    cdev, and the bind records vmrun writes for them are gone again."""
    records = set(os.listdir(BIND_RECORDS)) if BIND_RECORDS.is_dir() else set()
    try:
        yield
    finally:
        for d in find_edu_devices():
            if d.driver != "vfio-pci" or d.cdev is None:
                with contextlib.suppress(OSError):
                    bind_vfio_pci_by_sysfs(d.bdf)
        if BIND_RECORDS.is_dir():
            for name in set(os.listdir(BIND_RECORDS)) - records:
                (BIND_RECORDS / name).unlink()


def run_group(argv: Sequence[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group and kill the whole group on timeout: a vmrun
    that execs QEMU, or a `vmrun smoke` with its `vmrun run` child, leaves nothing behind."""
    proc = subprocess.Popen(
        list(argv),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise Failed(
            f"{' '.join(argv)} did not finish in {timeout:g}s and was killed\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Workdir:
    """Configs, vmrun's state dir and optionally a fresh QEMU capability cache, in a private
    dir under /run that goes away afterwards."""

    def __init__(self, prefix: str, fresh_cache: bool = False) -> None:
        self.path = private_dir(prefix, None)
        self.state = self.path / "state"
        self.env = {**os.environ, "VMRUN_STATE_DIR": str(self.state)}
        if fresh_cache:
            self.env["VMRUN_CACHE_DIR"] = str(self.path / "cache")

    @property
    def caps_cache(self) -> Path:
        return Path(self.env["VMRUN_CACHE_DIR"]) / "qemu-caps.json"

    def config(self, name: str, text: str) -> Path:
        path = self.path / f"{name}.toml"
        path.write_text(text)
        return path

    def vmrun(self, *args: str, wrapper: Sequence[str] = (), timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return run_group([*wrapper, str(VMRUN), *args], self.env, timeout)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def workdir(prefix: str, fresh_cache: bool = False) -> Iterator[Workdir]:
    why = vmrun_available()
    check(why is None, str(why))
    work = Workdir(prefix, fresh_cache)
    try:
        yield work
    finally:
        work.close()


def shown(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def refused_before_qemu(
    work: Workdir, cfg: Path, name: str, expected: Sequence[str], wrapper: Sequence[str] = ()
) -> str:
    """`vmrun run` must exit 1 with every expected text on stderr, having started no QEMU
    and recorded none; returns its stderr."""
    what = f"vmrun run {cfg.name}{' under ' + ' '.join(wrapper) if wrapper else ''}"
    try:
        # A refusal takes ~2 s here; still running after 30 s means it started QEMU.
        proc = work.vmrun("run", "--paused", str(cfg), wrapper=wrapper, timeout=30)
    except Failed as e:
        raise Failed(f"{what} did not refuse: {e}") from None
    check(proc.returncode == 1, f"{what}: expected exit 1\n{shown(proc)}\nconfig:\n{cfg.read_text()}")
    missing = [text for text in expected if text not in proc.stderr]
    check(not missing, f"{what}: stderr lacks {missing}\n{shown(proc)}")
    pid_file = work.state / name / "pid"
    check(not pid_file.exists(), f"{what} refused but recorded a QEMU pid: {pid_file} exists")
    running = qemu_processes(name)
    check(not running, f"{what} refused but a QEMU for {name} runs: {running}")
    return proc.stderr.strip()


@scenario
def vmrun_sysfsdev(bed: Bed) -> dict[str, Any]:
    """Both devices named by sysfsdev=: vmrun opens their cdevs, QEMU as nobody gets them as fds."""
    bdfs = bed.bdfs(2)
    cdevs = bed.cdevs(2)
    config = vmrun_config(
        "e2e-sysfsdev",
        vfio=[
            {"id": f"dev{i}", "sysfsdev": f"/sys/bus/pci/devices/{bdf}", "iommufd": "iommufd0"}
            for i, bdf in enumerate(bdfs)
        ],
    )
    with vmrun_vm("e2e-sysfsdev", config) as vm:
        planned = {f["path"] for f in vm.plan["fds"] if f["kind"] == "device"}
        check(
            set(cdevs) <= planned,
            f"the plan does not open the cdevs {cdevs} of the sysfsdev= devices; planned fds: {vm.plan['fds']}",
        )
        seen = check_as_planned(vm, ["dev0", "dev1"])
        by_sysfs = [a for a in seen["argv"] if "sysfsdev=" in a]
        check(not by_sysfs, f"QEMU was told to open devices by sysfsdev= itself: {by_sysfs}")
    return seen


@scenario
def vmrun_legacy_deprivileged_refused(bed: Bed) -> dict[str, Any]:
    """Legacy backend with user = nobody and root-only group files: plan and run refuse."""
    bdfs = bed.bdfs(2)
    groups = [d.group for d in bed.edu[:2]]
    for g in groups:
        # The refusal is only right while nobody may not open them, as devtmpfs makes them.
        st = os.stat(f"/dev/vfio/{g}")
        check(
            st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600,
            f"/dev/vfio/{g} is owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}: expected root 0600",
        )
    name = "e2e-legacy-nobody"
    config = vmrun_config(name, iommufd=[], vfio=[{"id": "dev0", "host": bdfs[0]}, {"id": "dev1", "host": bdfs[1]}])
    expected = [
        f"QEMU runs as {USER} and opens /dev/vfio/{g} itself on the legacy backend, but {USER} may not" for g in groups
    ]
    with workdir("legacy-refused-") as work:
        cfg = work.config(name, config)
        proc = work.vmrun("plan", "--json", str(cfg))
        check(proc.returncode == 0, f"vmrun plan failed\n{shown(proc)}")
        problems = json.loads(proc.stdout)["problems"]
        for text in expected:
            check(any(text in p for p in problems), f"vmrun plan does not list {text!r}; problems: {problems}")
        error = refused_before_qemu(work, cfg, name, expected)
    return {"plan_problems": problems, "run_stderr": error}


@scenario
def vmrun_memlock_not_raisable(bed: Bed) -> dict[str, Any]:
    """Root without CAP_SYS_RESOURCE under an 8 MiB hard RLIMIT_MEMLOCK: vmrun refuses."""
    bdf = bed.bdfs(1)[0]
    missing = [tool for tool in ("setpriv", "prlimit") if shutil.which(tool) is None]
    check(not missing, f"{missing} not found in the host root (Debian: util-linux)")
    hard = 8 * MIB
    wrapper = ["setpriv", "--bounding-set", "-sys_resource", "--", "prlimit", f"--memlock={hard}:{hard}"]
    name = "e2e-memlock-low"
    config = vmrun_config(name, vfio=[{"id": "dev0", "host": bdf, "iommufd": "iommufd0"}])
    with workdir("memlock-low-") as work:
        cfg = work.config(name, config)
        # The wrapper must really take the capability and the limit away, or the refusal
        # below would prove nothing.
        probe = run_group(
            [
                *wrapper,
                sys.executable,
                "-c",
                "import resource; print(open('/proc/self/status').read()); "
                "print('hard', resource.getrlimit(resource.RLIMIT_MEMLOCK)[1])",
            ],
            work.env,
            30,
        )
        status = dict(line.split(":\t", 1) for line in probe.stdout.splitlines() if ":\t" in line)
        cap_eff = int(status.get("CapEff", "0"), 16)
        check(
            probe.returncode == 0 and cap_eff != 0 and not cap_eff >> 24 & 1 and f"hard {hard}" in probe.stdout,
            f"the wrapper did not give a root process without CAP_SYS_RESOURCE (24) and an {hard} byte hard "
            f"limit: CapEff {status.get('CapEff')}\n{shown(probe)}",
        )
        plan = work.vmrun("plan", "--json", str(cfg))
        check(plan.returncode == 0, f"vmrun plan failed\n{shown(plan)}")
        planned = json.loads(plan.stdout)
        check(not planned["problems"], f"with CAP_SYS_RESOURCE the plan has problems: {planned['problems']}")
        need = planned["memlock_bytes"]
        check(need is not None and need > hard, f"the plan sets memlock {need}, not above {hard}")
        expected = (
            f"RLIMIT_MEMLOCK must be {need / MIB:g} MiB but the hard limit is {hard // MIB} MiB "
            "and vmrun lacks CAP_SYS_RESOURCE"
        )
        error = refused_before_qemu(work, cfg, name, [expected], wrapper=wrapper)
    return {"wrapper": wrapper, "stderr": error}


FAKE_QEMU = """#!/bin/sh
# A QEMU 7.2 as Debian 12 ships it, as far as vmrun's probe can tell: no iommufd object,
# a vfio-pci without fd= and iommufd=. It must never be launched for real.
echo "$*" >>"$0.log"
case "$*" in
    -version) echo "QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u7)"; exit 0 ;;
    "-sandbox on -version") echo "QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u7)"; exit 0 ;;
    *iommufd,help*) echo "qemu-system-x86_64: invalid object type: iommufd" >&2; exit 1 ;;
    *vfio-pci,help*) printf 'vfio-pci options:\\n  host=<str>\\n  sysfsdev=<str>\\n'; exit 0 ;;
    *,help*) echo "qemu-system-x86_64: -device ${4%,help}: Device not found" >&2; exit 1 ;;
esac
echo "fake QEMU 7.2 launched: $*" >&2
exit 99
"""


@scenario
def vmrun_host_problems(bed: Bed) -> dict[str, Any]:
    """No /dev/iommu, a QEMU without iommufd: each a clear exit 1 before QEMU. (A device
    not bound to vfio-pci is refused within vmrun_bind_check_round_trip, which unbinds one.)"""
    bdf = bed.bdfs(1)[0]
    name = "e2e-host-problems"
    device_cfg = {"id": "dev0", "host": bdf, "iommufd": "iommufd0"}
    out: dict[str, Any] = {}
    with workdir("host-problems-", fresh_cache=True) as work:
        cfg = work.config(name, vmrun_config(name, vfio=[device_cfg]))

        # (b) no /dev/iommu: a kernel without IOMMUFD, as vmrun sees it.
        check(not os.path.exists(IOMMU_AWAY), f"{IOMMU_AWAY} exists already")
        os.rename("/dev/iommu", IOMMU_AWAY)
        try:
            out["no_dev_iommu"] = refused_before_qemu(work, cfg, name, ["/dev/iommu does not exist"])
        finally:
            os.rename(IOMMU_AWAY, "/dev/iommu")

        # (c) a QEMU without iommufd. The fresh cache makes vmrun probe this very binary, as
        # the VM user: so the fake and its log live in a directory that user owns.
        fake = private_dir("qemu-7.2-", USER) / "qemu-7.2"
        fake.write_text(FAKE_QEMU)
        fake.chmod(0o755)
        fake_cfg = work.config(f"{name}-qemu", vmrun_config(name, vfio=[device_cfg], qemu=str(fake)))
        out["old_qemu"] = refused_before_qemu(
            work, fake_cfg, name, [f"QEMU 7.2.0 at {fake} has no iommufd backend (QEMU >= 9.0 needed)"]
        )
        calls = Path(f"{fake}.log").read_text().splitlines() if Path(f"{fake}.log").exists() else []
        check(bool(calls), f"vmrun never ran the fake QEMU {fake}: it did not probe it")
        launched = [c for c in calls if c not in ("-version", "-sandbox on -version") and not c.endswith(",help")]
        check(not launched, f"vmrun ran the fake QEMU beyond probing it: {launched}")
        cached = work.caps_cache.read_text() if work.caps_cache.exists() else ""
        check(str(fake) in cached, f"the capability cache {work.caps_cache} has no entry for {fake}:\n{cached}")
        out["fake_qemu_calls"] = calls
        shutil.rmtree(fake.parent, ignore_errors=True)
    return out


@scenario
def vmrun_bind_check_round_trip(bed: Bed) -> dict[str, Any]:
    """devices, check, unbind (check and run refuse), bind, prepare on the edu devices; the
    host ends as found. Also the cost of vmrun's QEMU capability probe."""
    bdfs = bed.bdfs(2)
    name = "e2e-preflight"
    config = vmrun_config(name, vfio=[{"id": f"dev{i}", "host": b, "iommufd": "iommufd0"} for i, b in enumerate(bdfs)])
    out: dict[str, Any] = {}
    with workdir("preflight-", fresh_cache=True) as work, edu_bindings_restored():
        cfg = work.config(name, config)

        proc = work.vmrun("devices", "--json")
        check(proc.returncode == 0, f"vmrun devices --json failed\n{shown(proc)}")
        listed = {d["address"]: d for d in json.loads(proc.stdout)}
        for d in bed.edu[:2]:
            row = listed.get(d.bdf)
            check(row is not None, f"vmrun devices does not list {d.bdf}: {sorted(listed)}")
            assert row is not None
            got = (row["vendor"], row["device"], row["driver"], row["iommu_group"], row["cdev"])
            want = ("1234", "11e8", "vfio-pci", d.group, d.cdev)
            check(got == want, f"vmrun devices shows {d.bdf} as {got}, sysfs says {want}")

        def run_check(label: str) -> tuple[subprocess.CompletedProcess[str], float]:
            t = time.monotonic()
            proc = work.vmrun("check", str(cfg))
            seconds = time.monotonic() - t
            bed.say(f"vmrun check ({label}): exit {proc.returncode} in {seconds:.2f}s")
            return proc, seconds

        def fails(proc: subprocess.CompletedProcess[str]) -> list[str]:
            return [line for line in proc.stdout.splitlines() if line.startswith("fail")]

        check(not work.caps_cache.exists(), f"{work.caps_cache} exists before the first check")
        cold, cold_s = run_check("empty capability cache")
        check(cold.returncode == 0 and not fails(cold), f"vmrun check of a good config\n{shown(cold)}")
        check(work.caps_cache.exists(), f"the first vmrun check left no capability cache {work.caps_cache}")
        cached_at = work.caps_cache.stat().st_mtime_ns
        warm, warm_s = run_check("cached")
        check(warm.returncode == 0 and not fails(warm), f"second vmrun check of a good config\n{shown(warm)}")
        # vmrun writes the cache only when it probed: unchanged means it used the cache.
        check(
            work.caps_cache.stat().st_mtime_ns == cached_at,
            f"the second vmrun check rewrote {work.caps_cache}: it probed QEMU again",
        )
        out["probe_cost_seconds"] = {"check, empty cache": round(cold_s, 2), "check, cached": round(warm_s, 2)}

        target = bed.edu[1]
        proc = work.vmrun("unbind", target.bdf)
        check(proc.returncode == 0 and "restored" in proc.stdout, f"vmrun unbind {target.bdf}\n{shown(proc)}")
        check(edu_device(target.bdf).driver is None, f"{target.bdf} is still on a driver after vmrun unbind")
        old_cdev = target.cdev
        check(
            wait_until(lambda: old_cdev is None or not os.path.exists(old_cdev), 5.0)
            and edu_device(target.bdf).cdev is None,
            f"the cdev of {target.bdf} ({old_cdev}) is still there after vmrun unbind",
        )
        broken, _ = run_check("device unbound")
        failing = fails(broken)
        check(
            broken.returncode == 1 and any(target.bdf in line for line in failing),
            f"vmrun check with {target.bdf} unbound: expected exit 1 and a fail line naming it\n{shown(broken)}",
        )
        check(
            f"fix: vmrun bind {target.bdf}" in broken.stdout,
            f"vmrun check does not give the fix `vmrun bind {target.bdf}`\n{shown(broken)}",
        )
        out["check_unbound"] = failing
        out["run_unbound"] = refused_before_qemu(
            work,
            cfg,
            name,
            [f"host={target.bdf} is bound to no driver, not vfio-pci (vmrun bind {target.bdf})"],
        )

        proc = work.vmrun("bind", target.bdf)
        check(proc.returncode == 0 and f"{target.bdf}: bound" in proc.stdout, f"vmrun bind {target.bdf}\n{shown(proc)}")
        back = edu_device(target.bdf)
        check(
            back.driver == "vfio-pci" and back.cdev is not None and Path(back.cdev).is_char_device(),
            f"after vmrun bind, {target.bdf} is {back}: not on vfio-pci with a cdev node",
        )
        again, _ = run_check("bound again")
        check(again.returncode == 0 and not fails(again), f"vmrun check after vmrun bind\n{shown(again)}")

        proc = work.vmrun("prepare", str(cfg))
        lines = proc.stdout.strip().splitlines()
        check(
            proc.returncode == 0 and all(any(line.startswith(f"{b}: already bound") for line in lines) for b in bdfs),
            f"vmrun prepare on bound devices must say 'already bound' for each of {bdfs}\n{shown(proc)}",
        )
        out["prepare"] = lines
        drivers = {d.bdf: d.driver for d in find_edu_devices()}
        check(set(drivers.values()) == {"vfio-pci"}, f"prepare changed drivers: {drivers}")
    return out


# --------------------------------------------------------------------------- configs/ in the bed

# Configs without devices (the demo) are smoke-tested paused here, like the others: their
# boot is proven on the host (tests/test_launch.py, tests/test_smoke.py), where it takes
# 1-2 s, while under TCG in TCG the demo kernel needs 55-65 s.
SMOKE_TIMEOUT = 60.0


def bed_variant(src: Path, bed: Bed) -> tuple[dict[str, Any], dict[int, str]]:
    """`src` with the bed's edu devices in place of its own, in order, and an L2's size;
    and the files the caller must pass at the config's `fd = N` numbers."""
    with src.open("rb") as f:
        data = tomllib.load(f)
    vm = data["vm"]
    vm.update(accel="tcg", memory=f"{L2_RAM_MIB}M", cpus=1)
    for key in ("kernel", "initrd", "uefi_vars"):
        if key in vm:
            vm[key] = str((src.parent / vm[key]).resolve())
    for disk in data.get("disk", []):
        disk["path"] = str((src.parent / disk["path"]).resolve())
    caller: dict[int, str] = {}
    for obj in data.get("iommufd", []):
        if "fd" in obj:
            caller[obj["fd"]] = "/dev/iommu"
    for dev, edu in zip(data.get("vfio", []), bed.edu, strict=False):
        if "host" in dev:
            dev["host"] = edu.bdf
        elif "sysfsdev" in dev:
            dev["sysfsdev"] = f"/sys/bus/pci/devices/{edu.bdf}"
        else:
            check(edu.cdev is not None, f"edu {edu.bdf} has no cdev to pass as fd {dev['fd']}")
            caller[dev["fd"]] = str(edu.cdev)
    return data, caller


def smoke_with_fds(work: Workdir, config: Path, caller: dict[int, str]) -> subprocess.CompletedProcess[str]:
    """`vmrun smoke CONFIG` with the files opened by us, inherited at the config's fd numbers."""
    numbers = sorted(caller)
    # The launcher places its fds at 3, 4, ... in order.
    check(
        numbers == list(range(3, 3 + len(numbers))),
        f"{config.name} takes caller fds {numbers}; the launcher can pass only 3, 4, ... in a row",
    )
    spec = Launch(
        argv=[str(VMRUN), "smoke", "--timeout", str(SMOKE_TIMEOUT), str(config)],
        fds=[caller[n] for n in numbers],
        user=None,
        env=work.env,
        session=True,
    )
    proc = Vm(spec, qmp_path="", workdir=private_dir("smoke-fds-", None))
    try:
        rc = proc.wait(SMOKE_TIMEOUT + 30)
        out = proc.out_path.read_text(errors="replace")
        check(rc is not None, f"vmrun smoke {config.name} did not finish in time\n{proc.describe()}\nstdout:\n{out}")
        assert rc is not None
        return subprocess.CompletedProcess(spec.argv, rc, out, proc.stderr())
    finally:
        proc.close()


def pass_line(proc: subprocess.CompletedProcess[str], config: Path) -> str:
    return next((line for line in proc.stdout.splitlines() if line.startswith(f"PASS {config}:")), "")


def smoke_passed(proc: subprocess.CompletedProcess[str], files: Sequence[Path]) -> None:
    failed = [str(f) for f in files if f"PASS {f}:" not in proc.stdout]
    check(proc.returncode == 0 and not failed, f"vmrun smoke did not pass {failed}\n{shown(proc)}")


@scenario
def vmrun_configs_in_bed(bed: Bed) -> dict[str, Any]:
    """Every example under configs/ through `vmrun smoke`, on the bed's edu devices."""
    ran: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with workdir("configs-") as work:
        plain: list[tuple[str, Path]] = []
        with_fds: list[tuple[str, Path, dict[int, str]]] = []
        as_is: list[Path] = []
        for src in sorted(CONFIGS.glob("*.toml")):
            data, caller = bed_variant(src, bed)
            n = len(data.get("vfio", []))
            if n == 0:
                as_is.append(src)
                continue
            if n > len(bed.edu):
                skipped[src.name] = f"needs {n} devices, the bed has {len(bed.edu)}"
                continue
            variant = work.config(src.stem, tomli_w.dumps(data))
            bed.say(f"{src.name} in the bed:\n{variant.read_text()}")
            if caller:
                with_fds.append((src.name, variant, caller))
            else:
                plain.append((src.name, variant))
        check(bool(plain or with_fds), f"no config under {CONFIGS} has [[vfio]] devices to run in the bed")

        if plain:
            files = [path for _, path in plain]
            proc = work.vmrun(
                "smoke", "--timeout", str(SMOKE_TIMEOUT), *map(str, files), timeout=SMOKE_TIMEOUT * len(files) + 30
            )
            smoke_passed(proc, files)
            ran.update((src_name, pass_line(proc, path)) for src_name, path in plain)
        for src_name, path, caller in with_fds:
            proc = smoke_with_fds(work, path, caller)
            smoke_passed(proc, [path])
            ran[src_name] = pass_line(proc, path)
        for src in as_is:
            argv = [str(VMRUN), "smoke", "--timeout", str(SMOKE_TIMEOUT), str(src)]
            proc = run_group(argv, work.env, SMOKE_TIMEOUT + 30)
            smoke_passed(proc, [src])
            ran[src.name] = pass_line(proc, src)
    bed.say(f"ran: {sorted(ran)}; skipped: {skipped}")
    return {"ran": ran, "skipped": skipped}


# --------------------------------------------------------------------------- main


@dataclasses.dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    details: dict[str, Any]
    error: str
    log: list[str]


def timed_vmrun(vm: VmrunVm, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = vm.vmrun(*args, check_rc=False)
    return proc, time.monotonic() - start


def peripheral_ids(vm: VmrunVm) -> set[str]:
    return {p["name"] for p in vm.vmrun("qmp", vm.name, "qom-list", '{"path": "/machine/peripheral"}')}


def object_ids(vm: VmrunVm) -> set[str]:
    return {p["name"] for p in vm.vmrun("qmp", vm.name, "qom-list", '{"path": "/objects"}')}


def write_fragment(vm: VmrunVm, name: str, bdf: str) -> str:
    path = vm.config_path.parent / name
    path.write_text(f'[[iommufd]]\nid = "iommufd1"\n\n[[vfio]]\nid = "dev1"\nhost = "{bdf}"\niommufd = "iommufd1"\n')
    return str(path)


@scenario
def vmrun_attach_detach_vfio(bed: Bed) -> dict[str, Any]:
    """vmrun attach puts a VFIO device with a new iommufd object into a running VM as nobody
    (memlock raised on the running QEMU); a second VM is refused the held device and is left
    as it was; detach of a device the guest never releases ends with exit 1, device kept."""
    bdf = bed.bdfs(2)[1]
    cdev = bed.cdevs(2)[1]
    with (
        vmrun_vm("e2e-attach", vmrun_config("e2e-attach", vfio=[], iommufd=[])) as a,
        vmrun_vm("e2e-attach-b", vmrun_config("e2e-attach-b", vfio=[], iommufd=[])) as b,
    ):
        for vm in (a, b):
            check(vm.wait_qmp(), f"{vm.name} did not start\n{vm.describe()}")
            vm.release_qmp()  # vmrun talks to QEMU itself: QEMU serves one QMP client at a time
        before = memlock_limit(a.pid)
        frag = write_fragment(a, "frag.toml", bdf)
        proc, attach_s = timed_vmrun(a, "attach", a.name, frag)
        check(proc.returncode == 0, f"vmrun attach exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
        bed.say(proc.stdout.strip())
        after = memlock_limit(a.pid)
        need = L2_RAM_MIB * MIB + VMRUN_MEMLOCK_MARGIN_MIB * MIB
        check(after == need, f"QEMU's memlock after attach is {after}, expected {need} (1 x RAM + margin)")
        check("dev1" in peripheral_ids(a), f"dev1 is not at /machine/peripheral/dev1 of {a.name}")
        check("iommufd1" in object_ids(a), f"no iommufd1 object in {a.name}")
        fds = proc_fd_targets(a.pid)
        check(cdev in fds.values(), f"QEMU does not hold {cdev}; its fds: {fds}")
        iommu_fds = [fd for fd, target in fds.items() if target == "/dev/iommu"]
        check(len(iommu_fds) == 1, f"QEMU should hold one /dev/iommu, holds {iommu_fds}")
        mode = accounting_mode_of(a.pid, iommu_fds[0])
        check(mode == 1, f"the attached iommufd has accounting mode {mode}, not per-process (1)")
        ps = a.vmrun("ps", "--json")
        shown = [d for vm in ps if vm["name"] == a.name for d in vm["devices"]]
        check(any("dev1" in d and "attached" in d for d in shown), f"vmrun ps does not show dev1: {shown}")

        # The same device for a second VM while the first holds it: refused, B as before.
        b_before = (memlock_limit(b.pid), peripheral_ids(b), object_ids(b))
        proc_b, _ = timed_vmrun(b, "attach", b.name, write_fragment(b, "frag.toml", bdf))
        check(proc_b.returncode == 1, f"attach of a held device exited {proc_b.returncode}\n{proc_b.stderr}")
        check("NOT undone" not in proc_b.stderr and "Traceback" not in proc_b.stderr, proc_b.stderr)
        b_after = (memlock_limit(b.pid), peripheral_ids(b), object_ids(b))
        check(b_after == b_before, f"{b.name} changed: {b_before} -> {b_after}\n{proc_b.stderr}")
        bed.say(f"second VM refused: {proc_b.stderr.strip().splitlines()[0]}")

        # The guest is paused and has no OS: it never releases the device.
        proc, detach_s = timed_vmrun(a, "detach", a.name, "dev1", "--timeout", "3")
        check(proc.returncode == 1, f"detach from a stuck guest exited {proc.returncode}\n{proc.stderr}")
        check("keeps running with the device" in proc.stderr, proc.stderr)
        check("dev1" in peripheral_ids(a) and cdev in proc_fd_targets(a.pid).values(), "dev1 went away")
        check(memlock_limit(a.pid) == after, "detach changed the memlock limit")
    return {
        "attach_seconds": round(attach_s, 2),
        "detach_timeout_seconds": round(detach_s, 2),
        "memlock_before": before,
        "memlock_after": after,
        "second_vm_refusal": proc_b.stderr.strip(),
    }


DEMO = CHECKOUT / "build" / "demo"
EDU_ID = "0x1234:0x11e8"


def guest_lines(sock: socket.socket, seen: list[str], until: Callable[[str], bool], timeout: float) -> str | None:
    """Read the L2 guest's console until a line satisfies `until`; that line, or None."""
    deadline = time.monotonic() + timeout
    buffer = ""
    while True:
        for line in seen:
            if until(line):
                seen.remove(line)
                return line
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            return None
        if not chunk:
            return None
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        seen += [line.strip() for line in lines]


@scenario
def vmrun_attach_second_address_space(bed: Bed) -> dict[str, Any]:
    """The hardening report's case: a VM with an iommufd object and a device of its own, and
    a fragment that brings a second address space (its own iommufd object and device). The
    attach raises QEMU's memlock to 2 x RAM + margin and the booted guest (the demo guest,
    watching its PCI functions) sees the device; detach takes it and its object out again."""
    check((DEMO / "vmlinuz").exists(), f"{DEMO} is missing: scripts/install builds the demo guest")
    bdfs, cdevs = bed.bdfs(2), bed.cdevs(2)
    # QEMU runs as nobody and opens the kernel itself: a copy where nobody can read it.
    boot = Path(tempfile.mkdtemp(prefix="vmrun-demo-", dir="/run"))
    boot.chmod(0o755)
    for name in ("vmlinuz", "initrd"):
        shutil.copy(DEMO / name, boot / name)
        (boot / name).chmod(0o644)
    config = vmrun_config(
        "e2e-second",
        vfio=[{"id": "dev0", "host": bdfs[0], "iommufd": "iommufd0"}],
        kernel=str(boot / "vmlinuz"),
        initrd=str(boot / "initrd"),
        append="console=ttyS0 quiet vmrun-demo=watch",
        console="socket",
    )
    seen: list[str] = []
    try:
        with vmrun_vm("e2e-second", config) as vm:
            check(vm.wait_qmp(), f"{vm.name} did not start\n{vm.describe()}")
            vm.release_qmp()
            console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            console.connect(str(vm.state / vm.name / "console.sock"))
            vm.vmrun("qmp", vm.name, "cont")
            start = time.monotonic()
            line = guest_lines(console, seen, lambda text: text.startswith("vmrun-demo: block:"), 600)
            boot_s = time.monotonic() - start
            check(line is not None and line.count(EDU_ID) == 1, f"the guest did not come up with dev0: {seen[-5:]}")
            bed.say(f"L2 guest up in {boot_s:.1f} s: {line}")
            before = memlock_limit(vm.pid)
            pinned_one = vm_pin_kib(vm.pid)
            one = L2_RAM_MIB * MIB + VMRUN_MEMLOCK_MARGIN_MIB * MIB
            check(before == one, f"QEMU's memlock at launch is {before}, expected {one}")

            frag = vm.config_path.parent / "second.toml"
            frag.write_text(
                f'[[iommufd]]\nid = "iommufd1"\n\n[[vfio]]\nid = "dev1"\nhost = "{bdfs[1]}"\niommufd = "iommufd1"\n'
            )
            proc, attach_s = timed_vmrun(vm, "attach", vm.name, str(frag))
            check(proc.returncode == 0, f"vmrun attach exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
            bed.say(proc.stdout.strip())
            after = memlock_limit(vm.pid)
            two = 2 * L2_RAM_MIB * MIB + VMRUN_MEMLOCK_MARGIN_MIB * MIB
            check(after == two, f"QEMU's memlock after the attach is {after}, expected {two} (2 x RAM + margin)")
            fds = proc_fd_targets(vm.pid)
            iommu_fds = [fd for fd, target in fds.items() if target == "/dev/iommu"]
            check(len(iommu_fds) == 2 and cdevs[1] in fds.values(), f"QEMU's fds after the attach: {fds}")
            modes = [accounting_mode_of(vm.pid, fd) for fd in iommu_fds]
            check(modes == [1, 1], f"accounting modes of QEMU's iommufd fds: {modes}, not per-process")
            pinned_two = vm_pin_kib(vm.pid)
            check(pinned_two >= 2 * pinned_one, f"VmPin {pinned_two} kB: the second address space pins no RAM")
            start = time.monotonic()
            line = guest_lines(console, seen, lambda text: text.count(EDU_ID) == 2, 300)
            check(line is not None, f"the guest never saw dev1: {seen[-5:]}")
            seen_s = time.monotonic() - start

            proc, detach_s = timed_vmrun(vm, "detach", vm.name, "dev1", "--timeout", "300")
            check(proc.returncode == 0, f"vmrun detach exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
            check("detached iommufd iommufd1" in proc.stdout, f"the object did not go with its device: {proc.stdout}")
            fds = proc_fd_targets(vm.pid)
            check(cdevs[1] not in fds.values(), f"QEMU still holds {cdevs[1]}: {fds}")
            # QEMU keeps an fd it was given for an iommufd object after object-del (it closes
            # only fds it opened itself): an empty context now, which pins nothing.
            pinned_after = vm_pin_kib(vm.pid)
            check(pinned_after == pinned_one, f"VmPin after the detach is {pinned_after} kB, {pinned_one} kB before")
            check("iommufd1" not in object_ids(vm) and "dev1" not in peripheral_ids(vm), "dev1 or iommufd1 stayed")
            line = guest_lines(console, seen, lambda text: "block:" in text and text.count(EDU_ID) == 1, 120)
            check(line is not None, f"the guest still shows dev1: {seen[-5:]}")
            shown = [d for listed in vm.vmrun("ps", "--json") for d in listed["devices"]]
            check(not any("dev1" in d for d in shown), f"vmrun ps still shows dev1: {shown}")
            console.close()
    finally:
        shutil.rmtree(boot, ignore_errors=True)
    return {
        "guest_boot_seconds": round(boot_s, 1),
        "attach_seconds": round(attach_s, 2),
        "guest_saw_device_seconds": round(seen_s, 1),
        "detach_seconds": round(detach_s, 2),
        "memlock_before": before,
        "memlock_after": after,
        "VmPin_kB": [pinned_one, pinned_two, pinned_after],
    }


def vm_pin_kib(pid: int) -> int:
    """The memory process `pid` has pinned (for DMA), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPin:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmPin")


def bar_region(query_pci: list[dict[str, Any]], qdev_id: str, size: int) -> dict[str, Any]:
    """The BAR of `size` bytes of device `qdev_id`, as the guest's firmware assigned it."""
    dev = pci_qdev_ids(query_pci).get(qdev_id)
    check(dev is not None, f"query-pci has no {qdev_id}")
    assert dev is not None
    regions = [r for r in dev.get("regions", []) if r.get("type") == "memory" and r.get("size") == size]
    check(len(regions) == 1, f"{qdev_id} has no BAR of {size} bytes: {dev.get('regions')}")
    return dict(regions[0])


def assigned(region: dict[str, Any], top: int) -> bool:
    """A BAR the firmware placed: QEMU shows an unassigned BAR at all ones (or beyond the space)."""
    address, size = int(region["address"]), int(region["size"])
    return address > 0 and address + size <= top


def firmware_ran(qmp: Qmp, qdev_id: str, size: int, timeout: float = 120.0) -> dict[str, Any]:
    """The BAR of `size` once SeaBIOS has enumerated the bus: ivshmem's 256-byte register BAR
    below 4 GiB has an address first; the 64-bit ones follow in the same pass, which under
    nested TCG takes seconds. A BAR still unplaced SETTLE seconds later found no room."""
    deadline = time.monotonic() + timeout
    while True:
        dev = pci_qdev_ids(qmp.execute("query-pci")).get(qdev_id, {})
        small = [r for r in dev.get("regions", []) if r.get("type") == "memory" and r.get("size") == 256]
        if small and 0 < int(small[0]["address"]) < 1 << 32:
            break
        check(time.monotonic() < deadline, f"the guest's firmware assigned nothing in {timeout:g} s: {dev}")
        time.sleep(0.5)
    settled = time.monotonic() + FIRMWARE_SETTLE
    region = bar_region(qmp.execute("query-pci"), qdev_id, size)
    while not assigned(region, 1 << 52) and time.monotonic() < settled:
        time.sleep(1.0)
        region = bar_region(qmp.execute("query-pci"), qdev_id, size)
    return region


# How long after the first BAR the firmware gets to place the others (nested TCG is slow).
FIRMWARE_SETTLE = 30.0


@scenario
def vmrun_big_bars(bed: Bed) -> dict[str, Any]:
    """Big BARs in the guest's address space, on L1's 44-bit CPU and 39-bit vIOMMU:
    - a 1 TiB BAR (iommufd): vmrun's plan gives the guest 41 address bits and SeaBIOS places
      the BAR inside them; the same device with QEMU's 40 bits is left unassigned;
    - a 1 GiB BAR on the legacy container, which maps BARs into the IOMMU: vmrun gives the
      guest 39 bits so the BAR lands where the 39-bit IOMMU reaches (QEMU maps it, P2P on);
      with QEMU's 40 the map fails;
    - an intel vIOMMU in the guest: vmrun gives it aw-bits=39; QEMU's default 48 is refused;
    - attach of the 1 GiB device: refused into a slot without a reservation, with the figures;
      into a slot with hotplug_reserve the firmware gave the port a window that holds it."""
    out: dict[str, Any] = {}
    big, one = bed.big_bar(1 << 40), bed.big_bar(GIB)
    root = {"user": None}  # QEMU as root: the raw comparisons open host= themselves
    # 1. The 1 TiB BAR.
    config = vmrun_config("e2e-1t", vfio=[{"id": "big", "host": big.bdf, "iommufd": "iommufd0"}])
    with vmrun_vm("e2e-1t", config) as vm:
        space = vm.plan["address_space"]
        # 1 TiB plus four empty slots' windows: a 2 TiB window, 42 bits.
        check(space["phys_bits"] == 42 and space["phys_bits_set"], f"the plan's address space: {space}")
        check("qemu64,phys-bits=42" in vm.plan["argv"], f"no phys-bits in {vm.plan['argv']}")
        check(vm.wait_qmp(), f"{vm.name} did not start\n{vm.describe()}")
        assert vm.qmp is not None
        vm.qmp.execute("cont")
        region = firmware_ran(vm.qmp, "big", 1 << 40)
        check(assigned(region, 1 << 42), f"vmrun's guest left the 1 TiB BAR at {region['address']:#x}")
        check(region["address"] >= space["ram_top"], f"the BAR at {region['address']:#x} overlaps RAM")
        out["bar_1t_at"] = f"{region['address']:#x} (42 bits, plan: {space['window_bytes']} byte window)"
        bed.say(f"1 TiB BAR assigned at {region['address']:#x} inside the 42-bit space vmrun planned")
    with l2(Launch(argv=[QEMU, *device(f"vfio-pci,id=big,host={big.bdf}")], **root)) as raw:  # type: ignore[arg-type]
        check(raw.wait_qmp(), f"raw L2 did not start\n{raw.describe()}")
        assert raw.qmp is not None
        raw.qmp.execute("cont")
        region = firmware_ran(raw.qmp, "big", 1 << 40)
        check(not assigned(region, 1 << 40), f"with QEMU's 40 bits the 1 TiB BAR got {region['address']:#x}")
        out["bar_1t_without_vmrun"] = f"{region['address']:#x} (unassigned)"
    # 2. The 1 GiB BAR on the legacy container: within the IOMMU's 39 bits.
    config = vmrun_config("e2e-1g", vfio=[{"id": "one", "host": one.bdf}], iommufd=[], user=None)
    with vmrun_vm("e2e-1g", config) as vm:
        check(vm.plan["address_space"]["phys_bits"] == 39, f"the plan: {vm.plan['address_space']}")
        check(vm.wait_qmp(), f"{vm.name} did not start\n{vm.describe()}")
        assert vm.qmp is not None
        locked_before = vm_lck_kib(vm.pid)
        vm.qmp.execute("cont")
        region = firmware_ran(vm.qmp, "one", GIB)
        check(assigned(region, 1 << 39), f"vmrun's guest put the 1 GiB BAR at {region['address']:#x}")
        out["bar_1g_legacy_at"] = f"{region['address']:#x}"
        # Once placed, the BAR is mapped into the container (type1 maps BARs): P2P works, and
        # what it costs in locked memory shows in VmLck.
        out["bar_1g_legacy_vmlck_kib"] = [locked_before, vm_lck_kib(vm.pid)]
        bad = [x for x in vm.stderr().splitlines() if "dma_map" in x or "peer-to-peer" in x]
        check(not bad, f"QEMU could not map the BAR: {bad}\n{vm.stderr()}")
    with l2(Launch(argv=[QEMU, *device(f"vfio-pci,id=one,host={one.bdf}")], **root)) as raw:  # type: ignore[arg-type]
        check(raw.wait_qmp(), f"raw L2 did not start\n{raw.describe()}")
        assert raw.qmp is not None
        raw.qmp.execute("cont")
        region = firmware_ran(raw.qmp, "one", GIB)
        raw.qmp.execute("quit")
        raw.wait(10)
        warned = [line for line in raw.stderr().splitlines() if "dma_map" in line or "peer-to-peer" in line]
        out["bar_1g_legacy_without_vmrun"] = f"{region['address']:#x}: {warned[:1]}"
        check(region["address"] >= 1 << 39 and bool(warned), f"QEMU's 40 bits: BAR at {region['address']:#x}, {warned}")
    # 3. An intel vIOMMU no wider than L1's.
    config = vmrun_config(
        "e2e-viommu", vfio=[{"id": "dev0", "host": bed.bdfs(1)[0], "iommufd": "iommufd0"}], viommu="intel"
    )
    with vmrun_vm("e2e-viommu", config) as vm:
        check(any("aw-bits=39" in a for a in vm.plan["argv"]), f"no aw-bits=39 in {vm.plan['argv']}")
        require_started(vm, ["dev0"])
    spec = Launch(
        argv=[
            QEMU,
            *device("intel-iommu,intremap=on,caching-mode=on"),
            *device(f"vfio-pci,id=dev0,host={bed.bdfs(1)[0]}"),
        ],
        **root,  # type: ignore[arg-type]
    )
    with l2(spec) as raw:
        check(not raw.wait_qmp(), f"QEMU's default intel-iommu started against a 39-bit host IOMMU\n{raw.describe()}")
        out["viommu_48_refused"] = next((x for x in raw.stderr().splitlines() if "aw-bits" in x), raw.stderr()[-300:])
        check("aw-bits 48 > host aw-bits 39" in raw.stderr(), raw.describe())
    # 3b. A guest L1's 39-bit VT-d cannot translate: its RAM alone reaches 40 bits. The plan
    # reads the width from L1's sysfs and refuses, naming both (no RAM is needed to plan).
    with workdir("narrow-") as work:
        path = work.config(
            "e2e-wide", vmrun_config("e2e-wide", vfio=[{"id": "dev0", "host": bed.bdfs(1)[0]}], memory="600G")
        )
        proc = work.vmrun("run", "--dry-run", str(path))
        check(proc.returncode == 1, f"vmrun run --dry-run of a 600 GiB guest exited {proc.returncode}\n{proc.stdout}")
        refusal = next((x for x in proc.stdout.splitlines() if "translates 39-bit addresses" in x), "")
        check("guest RAM reaches 602G, 40 bits" in refusal, f"no refusal naming the widths:\n{proc.stdout}")
        out["plan_refusal"] = refusal.removeprefix("# problem: ")
    # 4. Attach: refused without a reservation, into a reserved window with one.
    frag_text = f'[[iommufd]]\nid = "io1"\n\n[[vfio]]\nid = "one"\nhost = "{one.bdf}"\niommufd = "io1"\n'
    with vmrun_vm("e2e-slot", vmrun_config("e2e-slot", vfio=[], iommufd=[], hotplug_slots=1)) as vm:
        check(vm.wait_qmp(), f"{vm.name} did not start\n{vm.describe()}")
        vm.release_qmp()
        frag = vm.config_path.parent / "frag.toml"
        frag.write_text(frag_text)
        proc, _ = timed_vmrun(vm, "attach", vm.name, str(frag))
        check(proc.returncode == 2 and "does not fit a hot-plug slot" in proc.stderr, proc.stderr)
        out["attach_refused"] = proc.stderr.strip()
    config = vmrun_config("e2e-slot", vfio=[], iommufd=[], hotplug_slots=1, hotplug_reserve="1G")
    with vmrun_vm("e2e-slot", config) as vm:
        check(vm.wait_qmp(), f"{vm.name} did not start\n{vm.describe()}")
        assert vm.qmp is not None
        vm.qmp.execute("cont")
        time.sleep(8.0)  # SeaBIOS sizes the port's windows at boot
        ports = pci_qdev_ids(vm.qmp.execute("query-pci"))
        pref = ports["hotplug0"]["pci_bridge"]["bus"]["prefetchable_range"]
        window = pref["limit"] - pref["base"] + 1
        check(window >= GIB, f"the port reserved {window} bytes of prefetchable window, not 1 GiB: {pref}")
        vm.release_qmp()
        frag = vm.config_path.parent / "frag.toml"
        frag.write_text(frag_text)
        proc, attach_s = timed_vmrun(vm, "attach", vm.name, str(frag))
        check(proc.returncode == 0, f"attach into the reserved slot: {proc.returncode}\n{proc.stdout}{proc.stderr}")
        out["reserved_window"] = f"{pref['base']:#x}-{pref['limit']:#x}"
        out["attach_seconds"] = round(attach_s, 2)
    return out


def vm_lck_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return -1


# --------------------------------------------------------------------------- guest memory placement

# bed.numa_topology: L1 has two NUMA nodes (CPU 0 and CPU 1) and one edu device on node 1.
NUMA_NODE = 1
NUMA_RAM_MIB = 512
HUGEPAGES_2M = Path(f"/sys/devices/system/node/node{NUMA_NODE}/hugepages/hugepages-2048kB")


def numa_edu(bed: Bed) -> EduDevice:
    """The edu device on NUMA node 1 (behind L1's pxb-pcie)."""
    on_node = [d for d in bed.edu if read_int(Path(f"/sys/bus/pci/devices/{d.bdf}/numa_node")) == NUMA_NODE]
    check(len(on_node) == 1, f"expected one edu device on NUMA node {NUMA_NODE}, found {on_node} among {bed.edu}")
    return on_node[0]


def read_int(path: Path) -> int:
    return int(path.read_text().strip())


@contextlib.contextmanager
def reserved_hugepages(count: int) -> Iterator[int]:
    """`count` 2M pages reserved on node 1 for the block, released after it."""
    (HUGEPAGES_2M / "nr_hugepages").write_text(f"{count}\n")
    try:
        yield read_int(HUGEPAGES_2M / "free_hugepages")
    finally:
        (HUGEPAGES_2M / "nr_hugepages").write_text("0\n")


def wait_for_exec(vm: Vm, timeout: float = 30.0) -> float:
    """The moment the launched vmrun became QEMU (its comm changes at execve)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            comm = Path(f"/proc/{vm.pid}/comm").read_text().strip()
        except FileNotFoundError:
            comm = ""
        if comm.startswith("qemu-system"):
            return time.monotonic()
        if vm.poll() is not None:
            raise Failed(f"vmrun exited before it became QEMU\n{vm.describe()}")
        time.sleep(0.005)
    raise Failed(f"vmrun did not exec QEMU within {timeout}s\n{vm.describe()}")


def guest_ram_maps(pid: int, mib: int) -> list[str]:
    """The numa_maps lines of guest RAM: the mapping(s) holding `mib` MiB or more."""
    lines = []
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
        page_kib = int(fields.get("kernelpagesize_kB", "4"))
        pages = sum(int(v) for k, v in fields.items() if k.startswith("N") and k[1:].isdigit())
        if pages * page_kib >= mib * 1024:
            lines.append(line)
    return lines


def placed_vm(bed: Bed, name: str, hugepages: str) -> dict[str, Any]:
    """A 512 MiB VM with the node-1 device, numa = "auto": its start time and where its RAM is."""
    dev = numa_edu(bed)
    config = vmrun_config(
        name,
        vfio=[{"id": "numa0", "host": dev.bdf, "iommufd": "iommufd0"}],
        memory=f"{NUMA_RAM_MIB}M",
        hugepages=hugepages,
    )
    with vmrun_vm(name, config) as vm:
        check(vm.plan["cpu_affinity"] is not None, f"plan binds no CPUs: {vm.plan}")
        exec_at = wait_for_exec(vm)
        require_started(vm, ["numa0"])
        ready = time.monotonic() - exec_at
        seen = check_as_planned(vm, ["numa0"])
        node_cpus = Path(f"/sys/devices/system/node/node{NUMA_NODE}/cpulist").read_text().strip()
        status = proc_status(vm.pid)
        maps = guest_ram_maps(vm.pid, NUMA_RAM_MIB)
        vmpin_kib = int(status["VmPin"].split()[0])
    return {
        "start_to_qmp_ready_s": round(ready, 3),
        "plan_cpu_affinity": vm.plan["cpu_affinity"],
        "node_cpulist": node_cpus,
        "Cpus_allowed_list": status["Cpus_allowed_list"],
        "numa_maps": maps,
        "VmPin_kB": vmpin_kib,
        "memlock_bytes": seen["memlock_bytes"],
        "ram_backend": next(a for a in seen["argv"] if "id=guest-ram" in a),
    }


@scenario
def vmrun_numa_hugepages(bed: Bed) -> dict[str, Any]:
    """numa = "auto" binds a VM's RAM and CPUs to its device's node (L1 node 1), on 2M pages
    when asked; too few free pages is a plan problem; 4 KiB vs 2 MiB start times."""
    dev = numa_edu(bed)
    need = NUMA_RAM_MIB // 2
    # No pages reserved yet: the plan refuses with the figures, before anything starts.
    cfg = vmrun_config(
        "e2e-numa-short",
        vfio=[{"id": "numa0", "host": dev.bdf, "iommufd": "iommufd0"}],
        memory=f"{NUMA_RAM_MIB}M",
        hugepages="2M",
    )
    work_dir = private_dir("numa-plan-", None)
    try:
        (work_dir / "vm.toml").write_text(cfg)
        proc = subprocess.run(
            [str(VMRUN), "plan", "--json", str(work_dir / "vm.toml")], capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    short = [p for p in json.loads(proc.stdout or "{}").get("problems", []) if "vm.hugepages" in p]
    check(
        len(short) == 1 and f"needs {need} free 2M pages" in short[0] and f"NUMA node {NUMA_NODE}" in short[0],
        f"expected one vm.hugepages problem naming {need} pages on node {NUMA_NODE}\n{shown(proc)}",
    )
    bed.say(f"without reserved pages: {short[0]}")
    runs: dict[str, list[dict[str, Any]]] = {"4K": [], "2M": []}
    with reserved_hugepages(need) as free:
        check(free >= need, f"L1 reserved only {free} of {need} 2M pages on node {NUMA_NODE}")
        # Alternating, so that a slower phase of L1 weighs on both alike. One pair by
        # default (each VM costs ~15 s of the bed's budget); more for a steadier ratio.
        for _ in range(int(os.environ.get("VMRUN_E2E_NUMA_ROUNDS", "1"))):
            for pages, key in (("off", "4K"), ("2M", "2M")):
                runs[key].append(placed_vm(bed, f"e2e-numa-{key.lower()}", pages))
                bed.say(f"{key}: {runs[key][-1]['start_to_qmp_ready_s']} s to QMP ready")
        memlock_low = memlock_below_ram(bed, dev)
    for key, seen_runs in runs.items():
        for seen in seen_runs:
            check(
                seen["Cpus_allowed_list"] == seen["node_cpulist"],
                f"{key}: QEMU may run on CPUs {seen['Cpus_allowed_list']}, node {NUMA_NODE} has {seen['node_cpulist']}",
            )
            maps = seen["numa_maps"]
            check(len(maps) == 1, f"{key}: expected one guest RAM mapping in numa_maps, found {maps}")
            check(f"bind:{NUMA_NODE}" in maps[0], f"{key}: guest RAM is not bound to node {NUMA_NODE}: {maps[0]}")
            others = [f for f in maps[0].split() if f[0] == "N" and f[1:].split("=")[0].isdigit()]
            others = [f for f in others if not f.startswith(f"N{NUMA_NODE}=")]
            check(not others, f"{key}: guest RAM has pages on other nodes ({others}): {maps[0]}")
            # Huge pages change how memory is pinned, not how much: the same VmPin, within
            # vmrun's memlock=auto (RAM + margin).
            check(
                NUMA_RAM_MIB * 1024 <= seen["VmPin_kB"] <= seen["memlock_bytes"] // 1024,
                f"{key}: VmPin {seen['VmPin_kB']} kB outside [{NUMA_RAM_MIB} MiB, memlock {seen['memlock_bytes']}]",
            )
        huge = all("huge" in s["numa_maps"][0] and "kernelpagesize_kB=2048" in s["numa_maps"][0] for s in seen_runs)
        check(
            huge == (key == "2M"),
            f"{key}: guest RAM {'not ' if key == '2M' else ''}on 2M pages: {[s['numa_maps'] for s in seen_runs]}",
        )
    med = {k: statistics.median(s["start_to_qmp_ready_s"] for s in v) for k, v in runs.items()}
    return {
        "device": dev.bdf,
        "plan_problem_without_pages": short[0],
        "runs": runs,
        "median_start_to_qmp_ready_s": med,
        "ratio_4k_over_2m": round(med["4K"] / med["2M"], 2),
        "memlock_below_ram": memlock_low,
    }


def memlock_below_ram(bed: Bed, dev: EduDevice) -> str:
    """With huge pages the pinned RAM is still charged to RLIMIT_MEMLOCK: 500M < 512M fails."""
    name = "e2e-numa-lowlock"
    config = vmrun_config(
        name,
        vfio=[{"id": "numa0", "host": dev.bdf, "iommufd": "iommufd0"}],
        memory=f"{NUMA_RAM_MIB}M",
        hugepages="2M",
        memlock="500M",
    )
    with vmrun_vm(name, config) as vm:
        started = vm.wait_qmp()
        check(not started, f"QEMU started with RLIMIT_MEMLOCK 500M below {NUMA_RAM_MIB} MiB of huge-page RAM")
        err = vm.stderr()
        check("Cannot allocate memory" in err, f"QEMU failed, but not for want of locked memory:\n{err}")
    line = next((x for x in err.splitlines() if "Cannot allocate memory" in x), err)
    bed.say(f"memlock 500M with 512M on 2M pages: {line}")
    return line


# --------------------------------------------------------------------------- kept plans


def rebind_in_order(bdfs: Sequence[str]) -> None:
    """Unbind every device of `bdfs`, then bind them to vfio-pci in this order: the kernel
    numbers cdevs lowest free first, so the order decides which device gets which vfioN."""
    for bdf in bdfs:
        driver = Path("/sys/bus/pci/devices") / bdf / "driver"
        if driver.exists():
            (driver / "unbind").write_text(bdf)
    check(wait_until(lambda: all(edu_device(b).cdev is None for b in bdfs), 5.0), f"{bdfs} kept their cdevs")
    for bdf in bdfs:
        bind_vfio_pci_by_sysfs(bdf)


def kept_plan_launch(work: Workdir, name: str, cfg: Path, label: str) -> dict[str, Any]:
    """`vmrun run --paused CFG` with Python's import log: did it plan, which cdev QEMU holds."""
    env = {**work.env, "PYTHONPROFILEIMPORTTIME": "1"}
    vm = Vm(
        Launch(argv=[str(VMRUN), "run", "--paused", str(cfg)], user=None, env=env),
        str(work.state / name / "qmp.sock"),
        private_dir("kept-plan-", None),
    )
    try:
        start = time.monotonic()
        check(vm.wait_qmp(), f"{label}: QEMU did not start\n{vm.describe()}")
        ready = time.monotonic() - start
        require_started(vm, ["dev0"])
        held = sorted(t for t in proc_fd_targets(vm.pid).values() if t.startswith("/dev/vfio/devices/"))
        modules = {line.split("|")[2].strip() for line in vm.stderr().splitlines() if line.startswith("import time:")}
    finally:
        vm.close()
    return {
        "planned": "vmrun.plan.planner" in modules,
        "attrs": "attrs" in modules,
        "cdevs": held,
        "ready_s": round(ready, 2),
    }


@scenario
def vmrun_kept_plan(bed: Bed) -> dict[str, Any]:
    """`vmrun run` of an unchanged config launches the plan the last launch kept (no
    planning, no attrs imported) and QEMU realises the device on its cdev. Then the kernel
    renumbers the cdevs (two devices unbound, bound again in the other order): the cdev the
    kept plan names for the config's device is now the other device's. The next run must
    plan anew and QEMU must get the config's device at its new cdev."""
    mine, other = bed.edu[1], bed.edu[0]
    name = "e2e-kept"
    config = vmrun_config(name, vfio=[{"id": "dev0", "host": mine.bdf, "iommufd": "iommufd0"}])
    runs: dict[str, dict[str, Any]] = {}
    with workdir("kept-") as work, edu_bindings_restored():
        cfg = work.config(name, config)
        try:
            for label in ("first", "again"):
                runs[label] = kept_plan_launch(work, name, cfg, label)
            check(runs["first"]["planned"] and runs["first"]["cdevs"] == [mine.cdev], f"first launch: {runs}")
            again = runs["again"]
            check(not again["planned"] and not again["attrs"], f"the second launch planned again: {runs}")
            check(again["cdevs"] == [mine.cdev], f"from the kept plan QEMU holds {again['cdevs']}, not {mine.cdev}")

            rebind_in_order([mine.bdf, other.bdf])
            moved = edu_device(mine.bdf).cdev
            check(moved == other.cdev, f"{mine.bdf} was bound first but got {moved}, not {other.cdev}")
            bed.say(f"cdevs renumbered: {mine.bdf} {mine.cdev} -> {moved}, {other.bdf} -> {edu_device(other.bdf).cdev}")
            for label in ("renumbered", "renumbered again"):
                runs[label] = kept_plan_launch(work, name, cfg, label)
            check(runs["renumbered"]["planned"], f"the launch after renumbering used the stale plan: {runs}")
            check(
                runs["renumbered"]["cdevs"] == [moved] and runs["renumbered again"]["cdevs"] == [moved],
                f"QEMU did not get {mine.bdf}'s new cdev {moved}: {runs}",
            )
            check(not runs["renumbered again"]["planned"], f"the plan made after renumbering was not kept: {runs}")
        finally:
            rebind_in_order([other.bdf, mine.bdf])  # the numbering later scenarios were told
        check(
            edu_device(mine.bdf).cdev == mine.cdev and edu_device(other.bdf).cdev == other.cdev,
            "the cdev numbering was not restored",
        )
    for label, run in runs.items():
        bed.say(f"{label}: planned={run['planned']} attrs={run['attrs']} {run['cdevs']} QMP ready {run['ready_s']}s")
    return runs


# --------------------------------------------------------------------------- vmrun upgrade (CPR)

EDU_IDENT = 0x010000ED  # edu's register 0: its version and id, read through the passed BAR
BDA_TICKS = 0x46C  # the BIOS data area's timer tick count, which SeaBIOS's IRQ0 handler increments
RAM_MARK = 200 << 20  # a guest-physical address in the 256 MiB guest that SeaBIOS leaves alone


def hmp(qmp: Qmp, command: str) -> str:
    return str(qmp.execute("human-monitor-command", {"command-line": command}))


def guest_words(qmp: Qmp, address: int, count: int) -> list[int]:
    """`count` 32-bit words of guest-physical memory (a BAR's included), as QEMU reads them."""
    text = hmp(qmp, f"xp /{count}wx {address:#x}")
    return [int(w, 16) for line in text.splitlines() for w in line.split(":", 1)[1].split()]


def exited(pid: int) -> bool:
    """No such process, or a zombie nobody reaped (the new QEMU's parent, vmrun upgrade, is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def guest_ram_memfd(pid: int) -> Path:
    """The guest-RAM memfd of QEMU `pid` (vm.shared_ram), as root can open it through /proc."""
    for fd, target in proc_fd_targets(pid).items():
        if target.startswith("/memfd:memory-backend-memfd"):
            return Path(f"/proc/{pid}/fd/{fd}")
    raise Failed(f"QEMU {pid} holds no memory-backend-memfd: {proc_fd_targets(pid)}")


def edu_bar0(qmp: Qmp, device_id: str, timeout: float = 60.0) -> int:
    """Where the running guest's firmware put the passed edu's BAR0 (it runs, so SeaBIOS does)."""
    deadline = time.monotonic() + timeout
    while True:
        bars = pci_qdev_ids(qmp.execute("query-pci")).get(device_id, {}).get("regions", [])
        address = next((b.get("address") for b in bars if b.get("bar") == 0), None)
        if isinstance(address, int) and 0 < address < 0xFFFFFFFF:
            return address
        check(time.monotonic() < deadline, f"the guest's firmware gave {device_id} no BAR0 in {timeout:g}s: {bars}")
        time.sleep(0.5)


def guest_facts(qmp: Qmp, bar0: int) -> dict[str, Any]:
    """What must hold on either side of the switch: the device answers, the guest runs."""
    first = guest_words(qmp, BDA_TICKS, 1)[0]
    wait_until(lambda: guest_words(qmp, BDA_TICKS, 1)[0] > first, 30.0)
    return {
        "status": qmp.execute("query-status")["status"],
        "edu_ident": guest_words(qmp, bar0, 1)[0],
        "ticks": (first, guest_words(qmp, BDA_TICKS, 1)[0]),
        "mark": guest_words(qmp, RAM_MARK, 4),
    }


def upgrade_scenario(bed: Bed, name: str, backend: str, viommu: str | None = None) -> dict[str, Any]:
    """A running guest with a passed edu device moves to a new QEMU process (vmrun upgrade):
    RAM (a mark written into the guest-RAM memfd), the device (its ident read through the
    BAR), the guest (the firmware's timer ticks go on) and vmrun's hold (status, stop) all
    carry over; a QEMU that cannot take VFIO devices over is refused, a new QEMU that dies
    at start leaves the old one running the guest."""
    edu = bed.edu[0]
    vfio = {"id": "hostdev0", "host": edu.bdf}
    if backend == "iommufd":
        config = vmrun_config(name, vfio=[{**vfio, "iommufd": "iommufd0"}], viommu=viommu)
    else:
        config = vmrun_config(name, vfio=[vfio], iommufd=[], user=None)  # legacy: QEMU as root
    with vmrun_vm(name, config) as vm:
        vm.dir.chmod(0o755)  # both QEMUs reach the hand-over sockets by path, as under /run/vmrun
        require_started(vm, ["hostdev0"])
        assert vm.qmp is not None
        check("aux-ram-share=on" in " ".join(vm.plan["argv"]), f"no shared RAM in {vm.plan['argv']}")
        checked = vm.vmrun("check", str(vm.config_path), check_rc=False).stdout
        check(
            f"the kernel can move {backend} DMA mappings" in checked and "VFIO CPR" in checked,
            f"vmrun check does not say the VM can be upgraded:\n{checked}",
        )
        vm.qmp.execute("cont")
        bar0 = edu_bar0(vm.qmp, "hostdev0")
        mark = [int.from_bytes(os.urandom(4), "little") for _ in range(4)]
        with guest_ram_memfd(vm.pid).open("r+b") as ram:
            ram.seek(RAM_MARK)
            ram.write(b"".join(w.to_bytes(4, "little") for w in mark))
        before = guest_facts(vm.qmp, bar0)
        check(before["edu_ident"] == EDU_IDENT, f"edu answers {before['edu_ident']:#x} before the upgrade")
        check(before["mark"] == mark, f"the guest reads {before['mark']} where the memfd has {mark}")
        vm.release_qmp()  # vmrun upgrade needs QEMU's one QMP session
        old_pid = vm.pid
        old_pin = proc_status(old_pid).get("VmPin")

        refused = vm.vmrun("upgrade", name, "--qemu", "/usr/bin/qemu-system-x86_64", check_rc=False)
        check(
            refused.returncode == 1 and "cannot hand VFIO devices over" in refused.stderr,
            f"an upgrade to QEMU 10.0 (no VFIO CPR) was not refused: {refused.returncode} {refused.stderr}",
        )
        broken = vm.dir / "broken-qemu"
        broken.write_text(f'#!/bin/bash\nfor a; do [ "$a" = -incoming ] && exit 1; done\nexec -a "$0" {QEMU} "$@"\n')
        broken.chmod(0o755)
        failed = vm.vmrun("upgrade", name, "--qemu", str(broken), check_rc=False)
        check(
            failed.returncode == 1 and "the new QEMU exited" in failed.stderr,
            f"a new QEMU that dies at start: {failed.returncode} {failed.stderr}",
        )
        check(vm.poll() is None, "the old QEMU did not survive a failed upgrade")

        other = vm.dir / "qemu-system-x86_64"  # another binary, as a package update puts in place
        other.write_text(f'#!/bin/bash\nexec -a "$0" {QEMU} "$@"\n')
        other.chmod(0o755)
        done = vm.vmrun("upgrade", name, "--qemu", str(other), check_rc=False)
        check(done.returncode == 0, f"vmrun upgrade failed: {done.stdout}{done.stderr}\n{vm.stderr()}")
        paused = re.search(r"the guest paused (\d+) ms", done.stdout)
        check(vm.wait(15.0) is not None, "the old QEMU is still there after the upgrade")
        status = vm.vmrun("status", name, "--json")
        new_pid = int(status["pid"])
        check(new_pid != old_pid and status["state"] == "running", f"status after the upgrade: {status}")
        qmp = Qmp(vm.qmp_path)
        try:
            after = guest_facts(qmp, bar0)
        except (OSError, Failed) as e:
            raise Failed(
                f"the new QEMU (pid {new_pid}) after the upgrade: {e}\nits stderr:\n{vm.stderr()[-3000:]}"
            ) from e
        finally:
            qmp.close()
        check(after["status"] == "running", f"the guest is {after['status']} on the new QEMU")
        check(after["edu_ident"] == EDU_IDENT, f"edu answers {after['edu_ident']:#x} after the upgrade")
        check(after["mark"] == mark, f"the guest's RAM lost the mark: {after['mark']} != {mark}")
        check(after["ticks"][0] >= before["ticks"][1], f"the firmware's ticks went back: {before} -> {after}")
        new_status = proc_status(new_pid)
        check(
            new_status.get("Uid", "").split()[0] == str(0 if backend == "legacy" else pwd.getpwnam(USER).pw_uid),
            f"the new QEMU runs as {new_status.get('Uid')}",
        )
        check(new_status.get("NoNewPrivs") == "1", f"the new QEMU may gain privileges: {new_status}")
        fds = proc_fd_targets(new_pid)
        if backend == "iommufd":
            iommu = next((fd for fd, t in fds.items() if t == "/dev/iommu"), None)
            check(
                iommu is not None and accounting_mode_of(new_pid, iommu) == 1,
                f"the new QEMU's iommufd is not per-process accounted: {fds}",
            )
        stopped = vm.vmrun("stop", name, "--timeout", "5", check_rc=False)
        check(stopped.returncode == 0, f"vmrun stop after the upgrade: {stopped.stdout}{stopped.stderr}")
        check(wait_until(lambda: exited(new_pid), 15.0), "the new QEMU survived vmrun stop")
    details = {
        "pause_ms": int(paused[1]) if paused else None,
        "upgrade": done.stdout.strip(),
        "VmPin_old": old_pin,
        "VmPin_new": new_status.get("VmPin"),
        "before": {**before, "edu_ident": hex(before["edu_ident"])},
        "after": {**after, "edu_ident": hex(after["edu_ident"])},
    }
    bed.say(f"{backend}: {details['upgrade']}; VmPin {old_pin} -> {details['VmPin_new']}")
    return details


@scenario
def vmrun_upgrade_iommufd(bed: Bed) -> dict[str, Any]:
    """vmrun upgrade of a running guest with an edu device on iommufd (CPR, QEMU 10.1+, Linux 6.13+)."""
    return upgrade_scenario(bed, "e2e-up-iommufd", "iommufd")


@scenario
def vmrun_upgrade_legacy(bed: Bed) -> dict[str, Any]:
    """vmrun upgrade of a running guest with an edu device on the legacy container (type1 VADDR)."""
    return upgrade_scenario(bed, "e2e-up-legacy", "legacy")


@scenario
def vmrun_upgrade_viommu(bed: Bed) -> dict[str, Any]:
    """vmrun upgrade of a guest with an intel vIOMMU in front of its iommufd edu device."""
    return upgrade_scenario(bed, "e2e-up-viommu", "iommufd", viommu="intel")


# Scenarios of the newer stack (QEMU 10.2 as L2's QEMU, Linux 7.2 as L1's kernel): the upgrade
# ones, which need it, and those that must hold on any stack vmrun supports.
CPR_ONLY = {"vmrun_upgrade_iommufd", "vmrun_upgrade_legacy", "vmrun_upgrade_viommu"}
CPR_STACK = CPR_ONLY | {
    "bed_sanity",
    "vmrun_run_deprivileged",
    "vmrun_caller_fds",
    "vmrun_two_vms_one_uid",
    "memlock_bisect",
    "vmrun_attach_detach_vfio",
    "vmrun_legacy_as_root",
}


def stack_scenarios(stack: str) -> list[Scenario]:
    if stack == "cpr":
        return [s for s in SCENARIOS if s.name in CPR_STACK]
    return [s for s in SCENARIOS if s.name not in CPR_ONLY]


def host_state() -> dict[str, Any]:
    """What a scenario may change in L1 and must put back: the edu devices' binding, the
    device nodes with their owners, vmrun's bind records, QEMU processes."""
    edu = find_edu_devices()
    state: dict[str, Any] = {}
    for d in edu:
        # Existence, not the number: a device bound again may get another vfioN, harmlessly.
        has_cdev = d.cdev is not None and Path(d.cdev).is_char_device()
        state[d.bdf] = {"driver": d.driver, "group": d.group, "cdev": has_cdev}
    for node in ["/dev/iommu", "/dev/vfio/vfio", *(f"/dev/vfio/{d.group}" for d in edu if d.group)]:
        try:
            st = os.stat(node)
            state[node] = {"uid": st.st_uid, "gid": st.st_gid, "mode": f"{stat.S_IMODE(st.st_mode):04o}"}
        except FileNotFoundError:
            state[node] = "missing"
    state["vmrun bind records"] = sorted(os.listdir(BIND_RECORDS)) if BIND_RECORDS.is_dir() else []
    state["QEMU processes"] = sorted(qemu_processes().values())
    return state


def restore_host(before: dict[str, Any]) -> None:
    """The runner's safety net after a scenario left L1 changed (`before` is how it was):
    later scenarios need the devices on vfio-pci, the nodes as devtmpfs made them and no
    QEMU holding anything."""
    for pid in qemu_processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # A QEMU still dying holds its devices.
    wait_until(lambda: not qemu_processes(), 5.0)
    away = Path(IOMMU_AWAY)
    if away.exists() and not Path("/dev/iommu").exists():
        away.rename("/dev/iommu")
    for d in find_edu_devices():
        if d.driver != "vfio-pci" or d.cdev is None:
            with contextlib.suppress(OSError):
                bind_vfio_pci_by_sysfs(d.bdf)
    for node, was in before.items():
        if node.startswith("/dev/") and isinstance(was, dict):
            with contextlib.suppress(OSError):
                os.chown(node, was["uid"], was["gid"])
                os.chmod(node, int(was["mode"], 8))
    if BIND_RECORDS.is_dir():
        for name in set(os.listdir(BIND_RECORDS)) - set(before["vmrun bind records"]):
            (BIND_RECORDS / name).unlink()


def run_scenarios(selected: Sequence[Scenario], out: Path) -> list[Outcome]:
    started = time.monotonic()
    outcomes: list[Outcome] = []
    for sc in selected:
        # Read afresh: a scenario that unbinds and binds a device may renumber its cdev.
        bed = Bed(edu=find_edu_devices(), big={bar2_size(d.bdf): d for d in find_edu_devices(IVSHMEM_IDS)})
        before = host_state()
        print(f"== {sc.name}", flush=True)
        t = time.monotonic()
        details: dict[str, Any] = {}
        error = ""
        try:
            details = sc.func(bed)
        except Failed as e:
            error = str(e)
        except Exception:
            error = "scenario crashed:\n" + traceback.format_exc()
        after = host_state()
        if after != before:
            changed = {
                k: {"before": before.get(k), "after": after.get(k)}
                for k in before | after
                if before.get(k) != after.get(k)
            }
            error = (error + "\n" if error else "") + f"the scenario left L1 changed: {json.dumps(changed)}"
            restore_host(before)
        outcome = Outcome(sc.name, not error, time.monotonic() - t, details, error, bed.log)
        outcomes.append(outcome)
        print(f"   {'ok' if outcome.ok else 'FAILED'} in {outcome.seconds:.1f}s", flush=True)
        if error:
            print(error, flush=True)
        write_results(out, outcomes, time.monotonic() - started, complete=False)
    write_results(out, outcomes, time.monotonic() - started, complete=True)
    return outcomes


def write_results(out: Path, outcomes: list[Outcome], seconds: float, complete: bool) -> None:
    data = {
        "complete": complete,
        "seconds": seconds,
        "kernel": os.uname().release,
        "scenarios": {o.name: dataclasses.asdict(o) for o in outcomes},
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default_out = Path(os.environ.get("VMRUN_E2E_RESULTS", ".")) / "scenarios.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--only", action="append", choices=[s.name for s in SCENARIOS])
    parser.add_argument("--stack", choices=("base", "cpr"), default="base")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.environ.get("VMRUN_E2E_IN_BED"):
        print("inside.py runs inside the e2e bed's L1 VM as root (see bed.py)", file=sys.stderr)
        return 2
    # The host's home is read-only here: without a cache of its own every vmrun call would
    # probe QEMU again (several QEMU processes, about a second under TCG).
    cache = Path("/run/vmrun-e2e-cache")
    cache.mkdir(mode=0o700, exist_ok=True)
    os.environ["VMRUN_CACHE_DIR"] = str(cache)
    selected = [s for s in stack_scenarios(args.stack) if not args.only or s.name in args.only]
    outcomes = run_scenarios(selected, args.out)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
