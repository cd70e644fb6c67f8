"""Scenario runner of the e2e test bed; runs INSIDE the L1 VM, as root.

Each scenario is a function registered with @scenario. It starts L2 QEMUs (TCG, -S, a
QMP socket) against the edu devices bound to vfio-pci in L1, raises Failed with an
explanation when a fact does not hold, and returns details worth reporting. All
scenarios run in one boot; the results go to $VMRUN_E2E_RESULTS/scenarios.json, which
is rewritten after every scenario so that a timeout still leaves partial results.

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
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
VMRUN = CHECKOUT / ".venv" / "bin" / "vmrun"
QEMU = "qemu-system-x86_64"
EDU_VENDOR, EDU_DEVICE = "0x1234", "0x11e8"
USER = "nobody"
MIB = 1024 * 1024
L2_RAM_MIB = 256
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


def scenario_names() -> list[str]:
    return [s.name for s in SCENARIOS]


# --------------------------------------------------------------------------- the bed


@dataclasses.dataclass(frozen=True)
class EduDevice:
    bdf: str
    driver: str | None
    group: str | None
    cdev: str | None  # /dev/vfio/devices/vfioN


def find_edu_devices() -> list[EduDevice]:
    found = []
    for dev in sorted(Path("/sys/bus/pci/devices").iterdir()):
        vendor = (dev / "vendor").read_text().strip()
        device = (dev / "device").read_text().strip()
        if (vendor, device) != (EDU_VENDOR, EDU_DEVICE):
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


@dataclasses.dataclass
class Bed:
    edu: list[EduDevice]
    log: list[str] = dataclasses.field(default_factory=list)

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


def _launcher_child(spec: Launch, out_fd: int, err_fd: int) -> None:
    """Runs in the forked child; never returns (execs QEMU or _exits 126)."""
    try:
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
    """/dev/iommu and two vfio cdevs exist; both edu devices are bound to vfio-pci."""
    check(Path("/dev/iommu").is_char_device(), "/dev/iommu is missing or not a char device")
    cdevs = sorted(str(p) for p in Path("/dev/vfio/devices").glob("vfio*"))
    check(len(cdevs) == 2, f"expected 2 vfio cdevs in /dev/vfio/devices, found {cdevs}")
    check(len(bed.edu) == 2, f"expected 2 edu devices, found {bed.edu}")
    for d in bed.edu:
        check(d.driver == "vfio-pci", f"edu {d.bdf} is bound to {d.driver}, not vfio-pci")
        check(d.group is not None, f"edu {d.bdf} has no iommu_group (is the vIOMMU on?)")
        check(d.cdev in cdevs, f"edu {d.bdf}: cdev {d.cdev} not among {cdevs}")
        check(
            Path(f"/dev/vfio/{d.group}").is_char_device(),
            f"group node /dev/vfio/{d.group} of {d.bdf} is missing",
        )
    check(Path("/dev/vfio/vfio").is_char_device(), "legacy container /dev/vfio/vfio is missing")
    return {"edu": [dataclasses.asdict(d) for d in bed.edu]}


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


MEMLOCK_SETUPS: dict[str, tuple[int, Callable[[Bed], Launch]]] = {}


def memlock_setup(name: str, address_spaces: int) -> Callable[[Callable[[Bed], Launch]], Callable[[Bed], Launch]]:
    def register(make: Callable[[Bed], Launch]) -> Callable[[Bed], Launch]:
        MEMLOCK_SETUPS[name] = (address_spaces, make)
        return make

    return register


@memlock_setup("iommufd, one shared object, 2 devices", address_spaces=1)
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


@memlock_setup("iommufd, two objects, one device each", address_spaces=2)
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


@memlock_setup("legacy type1, 2 devices", address_spaces=1)
def _legacy(bed: Bed) -> Launch:
    bdfs = bed.bdfs(2)
    return Launch(
        argv=[
            QEMU,
            *device(f"vfio-pci,id=dev0,host={bdfs[0]}"),
            *device(f"vfio-pci,id=dev1,host={bdfs[1]}"),
        ],
    )


@contextlib.contextmanager
def groups_owned_by(bed: Bed, user: str) -> Iterator[None]:
    """Legacy VFIO needs the group nodes; hand them to `user` (L1's /dev is ours to change).

    Running legacy as root instead would measure nothing: CAP_IPC_LOCK skips accounting.
    """
    pw = pwd.getpwnam(user)
    nodes = [Path(f"/dev/vfio/{d.group}") for d in bed.edu if d.group]
    saved = {n: n.stat() for n in nodes}
    try:
        for n in nodes:
            os.chown(n, pw.pw_uid, pw.pw_gid)
        yield
    finally:
        for n, st in saved.items():
            os.chown(n, st.st_uid, st.st_gid)


def bisect_memlock(bed: Bed, spec: Launch, lo_mib: int = 1, hi_mib: int = 1024) -> dict[str, Any]:
    """Smallest RLIMIT_MEMLOCK (MiB) with which L2 starts and realizes dev0 and dev1."""
    ids = ["dev0", "dev1"]
    probes: list[tuple[int, bool]] = []

    def ok(mib: int) -> bool:
        t = time.monotonic()
        good, err = starts(dataclasses.replace(spec, memlock=mib * MIB), ids)
        probes.append((mib, good))
        bed.say(f"memlock {mib} MiB: {'starts' if good else 'fails'} ({time.monotonic() - t:.1f}s)")
        if not good:
            last_err[0] = err
        return good

    last_err = [""]
    check(ok(hi_mib), f"L2 does not start even with {hi_mib} MiB:\n{last_err[0]}")
    if ok(lo_mib):
        return {"need_mib": lo_mib, "probes": probes, "error_below": None}
    good, bad = hi_mib, lo_mib
    while good - bad > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    # The error text of the probe just below the need, to see what QEMU says about it.
    error_below = last_err[0] if probes[-1][1] else None
    if error_below is None:
        _, error_below = starts(dataclasses.replace(spec, memlock=bad * MIB), ids)
    return {"need_mib": good, "probes": probes, "error_below": error_below.strip()[-600:]}


@scenario
def memlock_bisect(bed: Bed) -> dict[str, Any]:
    """Smallest RLIMIT_MEMLOCK that starts L2 (256 MiB RAM) per backend setup."""
    table: dict[str, Any] = {}
    for name, (spaces, make) in MEMLOCK_SETUPS.items():
        bed.say(f"bisecting: {name}")
        spec = make(bed)
        ctx = groups_owned_by(bed, USER) if not spec.fds else contextlib.nullcontext()
        with ctx:
            found = bisect_memlock(bed, spec)
        found["address_spaces"] = spaces
        table[name] = found
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
    return {"table_mib": summary, "details": table}


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
    vfio: Sequence[dict[str, object]],
    iommufd: Sequence[dict[str, object]] = ({"id": "iommufd0"},),
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


# --------------------------------------------------------------------------- main


@dataclasses.dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    details: dict[str, Any]
    error: str
    log: list[str]


def run_scenarios(selected: Sequence[Scenario], out: Path) -> list[Outcome]:
    started = time.monotonic()
    edu = find_edu_devices()
    outcomes: list[Outcome] = []
    for sc in selected:
        bed = Bed(edu=edu)
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
    parser.add_argument("--only", action="append", choices=scenario_names())
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.environ.get("VMRUN_E2E_IN_BED"):
        print("inside.py runs inside the e2e bed's L1 VM as root (see bed.py)", file=sys.stderr)
        return 2
    selected = [s for s in SCENARIOS if not args.only or s.name in args.only]
    outcomes = run_scenarios(selected, args.out)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
