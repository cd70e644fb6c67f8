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
        os.execv(exe, spec.argv)
    except BaseException:
        os.write(2, ("launcher: " + traceback.format_exc()).encode())
    os._exit(126)


class L2:
    """One L2 QEMU started through the launcher, with a QMP unix socket."""

    def __init__(self, spec: Launch, extra_args: Sequence[str] = (), memory_mib: int = 256):
        # A dir only the QEMU user (and root) can write: nobody else can plant the socket.
        self.dir = Path(tempfile.mkdtemp(prefix="l2-", dir="/run"))
        if spec.user is not None:
            pw = pwd.getpwnam(spec.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)
        self.qmp_path = str(self.dir / "qmp.sock")
        argv = [
            *spec.argv,
            "-machine", "q35",
            "-accel", "tcg",
            "-m", f"{memory_mib}M",
            "-nodefaults",
            "-display", "none",
            "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *extra_args,
        ]  # fmt: skip
        self.spec = dataclasses.replace(spec, argv=argv)
        self.out_path = self.dir / "stdout"
        self.err_path = self.dir / "stderr"
        self.returncode: int | None = None
        self.qmp: Qmp | None = None
        self.started_at = time.monotonic()
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
        raise Failed(f"L2 neither exited nor answered QMP in {timeout}s\n{self.describe()}")

    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return (
            f"argv: {' '.join(self.argv)}\nfds: {self.spec.fds} user: {self.spec.user} "
            f"memlock: {self.spec.memlock}\nexit: {self.returncode}\nstderr:\n{self.stderr()}"
        )

    def quit(self) -> int | None:
        if self.qmp is not None and self.poll() is None:
            with contextlib.suppress(OSError, ConnectionError, Failed):
                self.qmp.execute("quit")
        if self.wait(15.0) is None:
            self.kill()
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait(10.0)

    def close(self) -> None:
        self.quit()
        if self.qmp is not None:
            self.qmp.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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


def check_deprivileged(proc: L2, user: str, expected_fds: dict[int, str]) -> dict[str, Any]:
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


def require_started(proc: L2, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
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
            f"QEMU as {USER} opened {cdev} on its own: the cdev is not root-only?\n"
            + proc.describe(),
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


def memlock_setup(
    name: str, address_spaces: int
) -> Callable[[Callable[[Bed], Launch]], Callable[[Bed], Launch]]:
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
    return {"per_user_second_vm_error": collision[-600:]}


# --------------------------------------------------------------------------- vmrun


def vmrun_available() -> str | None:
    """Why the vmrun scenarios cannot run, or None."""
    if not os.access(VMRUN, os.X_OK):
        return f"{VMRUN} does not exist (install the package into .venv)"
    return None


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
