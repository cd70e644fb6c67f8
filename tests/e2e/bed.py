"""The nested e2e test bed: an L1 VM (TCG, emulated intel-iommu, edu PCI devices) whose
kernel has IOMMUFD and VFIO cdevs, booted from the host's root file system over 9p.

Booting takes seconds, so callers run one command per boot that executes many
scenarios and leaves its findings in the writable results share.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
BUILD_KERNEL = HERE / "build-kernel"
L1_INIT = HERE / "l1-init"
QEMU = "qemu-system-x86_64"
# Mount point of the results share inside L1 (see l1-init).
L1_RESULTS = "/run/e2e-results"


class BedError(RuntimeError):
    """The bed itself could not be built or booted (as opposed to a scenario failing)."""


@dataclasses.dataclass(frozen=True)
class BedResult:
    # None when the command never finished (timeout, crash, bed error).
    returncode: int | None
    stdout: str
    stderr: str
    console_log: str
    wall_seconds: float
    timed_out: bool = False
    # This boot hung in the kernel (see STALL_MARKER) and was killed.
    stalled: bool = False
    # Console tails of earlier boots that stalled and were retried.
    stalled_boots: list[str] = dataclasses.field(default_factory=list)
    # Why l1-init gave up before running the command, if it did.
    bed_error: str | None = None
    # L1 uptime when init started: the kernel's share of the boot.
    boot_seconds: float | None = None
    qemu_returncode: int | None = None
    init_log: str = ""

    def describe(self) -> str:
        """Everything needed to understand a failed run, for assertion messages."""
        return (
            f"returncode={self.returncode} timed_out={self.timed_out} stalled={self.stalled} "
            f"retried stalls={len(self.stalled_boots)} "
            f"qemu_returncode={self.qemu_returncode} wall={self.wall_seconds:.1f}s\n"
            f"bed_error: {self.bed_error}\n"
            f"--- init.log ---\n{self.init_log}"
            f"--- stdout ---\n{_tail(self.stdout)}\n"
            f"--- stderr ---\n{_tail(self.stderr)}\n"
            f"--- console ---\n{_tail(self.console_log)}"
        )


@dataclasses.dataclass
class E2ERun:
    """One boot of the bed running inside.py, as the outer tests see it."""

    result: BedResult
    kernel: Path
    # scenarios.json written by inside.py, or None when it never appeared.
    data: dict[str, Any] | None

    def scenario(self, name: str) -> dict[str, Any]:
        """The outcome of one scenario; raises BedError saying why there is none."""
        if self.data is None:
            raise BedError(f"the bed produced no scenarios.json\n{self.result.describe()}")
        outcome: dict[str, Any] | None = self.data["scenarios"].get(name)
        if outcome is None:
            raise BedError(
                f"scenario {name} did not run (complete={self.data['complete']}; "
                f"ran: {sorted(self.data['scenarios'])})\n{self.result.describe()}"
            )
        return outcome


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def built(command: Sequence[str]) -> Path:
    """What a build script (cached builds: the kernel, QEMU) printed last: the file it made."""
    proc = subprocess.run(list(command), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BedError(
            f"{command[0]} failed with exit code {proc.returncode}:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
        )
    path = Path(lines[-1])
    if not path.is_file():
        raise BedError(f"{command[0]} printed {path}, which is not a file")
    return path


def kernel_path(source: str | None = None) -> Path:
    """Build (or find in the cache) the L1 kernel (Debian's linux-source-6.12, or `source`,
    e.g. linux-source-7.2 for the newer stack); raises BedError with the build log."""
    return built([str(BUILD_KERNEL), *(["--source", source] if source else [])])


# The newer stack: QEMU 10.2 (VFIO CPR, with vmrun's patch for TCG) as L2's QEMU on Linux 7.2
# (IOMMU_IOAS_CHANGE_PROCESS) as L1's kernel, for `vmrun upgrade`.
CPR_KERNEL_SOURCE = "linux-source-7.2"
BUILD_QEMU = CHECKOUT / "scripts" / "build-qemu"


def cpr_qemu_path() -> Path:
    """Build (or find in the cache) the newer stack's QEMU, where nobody may run it."""
    return built([str(BUILD_QEMU)])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def l1_argv(kernel: Path, results: Path, n_edu: int, memory: str) -> list[str]:
    for p in (L1_INIT, results):
        # The kernel command line and -fsdev options cannot quote these.
        if any(c in str(p) for c in " ,\t\n"):
            raise BedError(f"path {p} contains a space or comma; the bed cannot use it")
    # cache=loose lets L1 keep file pages of the host root: every L2 start maps QEMU and
    # ~100 libraries, which takes 2.5 s uncached and 0.35 s cached. Safe because nothing
    # changes the host's files while a boot runs; the results share stays uncached.
    append = " ".join(
        [
            "console=ttyS0",
            "root=hostroot",
            "rootfstype=9p",
            "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose",
            "ro",
            f"init={L1_INIT}",
            "intel_iommu=on",
            "quiet",
            "panic=-1",
        ]
    )
    argv = [
        QEMU,
        # Never kvm: a Linux guest under KVM hangs on these machines.
        "-accel", "tcg",
        "-m", memory,
        "-smp", "2",
        "-machine", "q35",
        # 44 address bits: room for the 1 TiB BAR below (QEMU's 40 would not place it).
        "-cpu", "qemu64,phys-bits=44",
        "-nic", "none",
        # The vIOMMU must come before the devices it translates for. 39 bits, as VT-d on
        # client parts: vmrun reads the width (cap MGAW) and keeps within it.
        "-device", "intel-iommu,aw-bits=39",
    ]  # fmt: skip
    for _ in range(n_edu):
        argv += ["-device", "edu"]
    # Devices with big BARs for vmrun's address-space planning: ivshmem-plain's BAR2 is as large
    # as its memory backend, 64-bit prefetchable, and a memfd costs only the pages touched.
    for name, size in BIG_BAR_DEVICES:
        argv += [
            "-object", f"memory-backend-memfd,id={name},size={size},share=on",
            "-device", f"ivshmem-plain,id={name},memdev={name}",
        ]  # fmt: skip
    argv += [
        "-kernel", str(kernel),
        "-append", append,
        "-fsdev", "local,id=root,path=/,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
        "-fsdev", f"local,id=results,path={results},security_model=none",
        "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
        "-nographic",
        "-no-reboot",
        "-serial", "mon:stdio",
    ]  # fmt: skip
    argv += numa_topology(memory)
    return argv


# ivshmem-plain devices of L1 (1af4:1110): (id, size of BAR2), bound to vfio-pci by l1-init
# after the edu devices (so these keep their cdev numbers).
BIG_BAR_DEVICES = (("bar1g", "1G"), ("bar1t", "1T"))

# The edu device on L1's NUMA node 1 (see numa_topology): behind its own host bridge and
# root port, so its bus number (0x81) sorts after the edu devices on pcie.0, which keep
# their addresses and their places in inside.py's list.
NUMA_EDU_BUS = 0x81
NUMA_EDU_NODE = 1


def numa_topology(memory: str) -> list[str]:
    """Two NUMA nodes in L1 (a CPU and half the RAM each) and an edu device on node 1.

    A pxb-pcie is an extra PCI host bridge that ACPI places on a node (_PXM), which is how
    a real host's device gets the numa_node that vmrun's numa = "auto" reads.
    """
    units = {"M": 1, "G": 1024}
    total = int(memory[:-1]) * units[memory[-1].upper()]
    node0 = total // 2
    return [
        "-object", f"memory-backend-ram,id=l1-ram0,size={node0}M",
        "-object", f"memory-backend-ram,id=l1-ram1,size={total - node0}M",
        "-numa", "node,nodeid=0,cpus=0,memdev=l1-ram0",
        "-numa", f"node,nodeid={NUMA_EDU_NODE},cpus=1,memdev=l1-ram1",
        "-device", f"pxb-pcie,id=pxb1,bus_nr={NUMA_EDU_BUS - 1},numa_node={NUMA_EDU_NODE},bus=pcie.0",
        "-device", "pcie-root-port,id=pxb1-port0,bus=pxb1,chassis=1,slot=0",
        "-device", "edu,bus=pxb1-port0",
    ]  # fmt: skip


# L1 hangs now and then under TCG: a vCPU idles and its timer never fires again (the kernel
# says "rcu: INFO: rcu_sched detected stalls ... Possible timer handling issue"). Seen
# about once in 20 runs here; the run never recovers from it, so treat it as a dead boot.
STALL_MARKER = b"detected stalls on CPUs"


def _boot_once(argv: list[str], results: Path, timeout: float) -> tuple[int | None, bool, bool, float]:
    """Run L1 until it exits, times out or stalls: (qemu rc, timed out, stalled, seconds)."""
    console_path = results / "console.log"
    start = time.monotonic()
    deadline = start + timeout
    with console_path.open("wb") as console:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    rc: int | None = proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                    return rc, False, False, time.monotonic() - start
                except subprocess.TimeoutExpired:
                    pass
                if STALL_MARKER in console_path.read_bytes():
                    return None, False, True, time.monotonic() - start
                if time.monotonic() >= deadline:
                    return None, True, False, time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_in_bed(
    command: Sequence[str],
    timeout: float,
    n_edu: int = 2,
    # 2G for the scenarios, plus room on node 1 for a 512M guest on 2M pages beside one on 4K pages.
    memory: str = "3G",
    *,
    results_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = CHECKOUT,
    kernel: Path | None = None,
    stall_retries: int = 1,
) -> BedResult:
    """Boot L1, run `command` there as root, power off, and report.

    Inside L1 the command finds the results share at $VMRUN_E2E_RESULTS; pass
    `results_dir` to keep what it writes there (otherwise a temp dir is used and removed).
    A boot that stalls (see STALL_MARKER) is killed and, up to `stall_retries` times,
    booted again from scratch; `timeout` applies to each boot, `wall_seconds` to all.
    """
    image = kernel if kernel is not None else kernel_path()
    own_dir = results_dir is None
    results = Path(tempfile.mkdtemp(prefix="vmrun-e2e-")) if own_dir else results_dir
    assert results is not None
    try:
        results.mkdir(parents=True, exist_ok=True)
        argv = l1_argv(image, results, n_edu, memory)
        script = [f"cd {shlex.quote(str(cwd))} || exit 125"]
        script += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
        script.append("exec " + shlex.join(command))
        wall = 0.0
        stalls: list[str] = []
        while True:
            # Everything a boot leaves behind goes, so a retry cannot report the old run.
            for old in results.iterdir():
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            (results / "command").write_text("\n".join(script) + "\n")
            qemu_rc, timed_out, stalled, seconds = _boot_once(argv, results, timeout)
            wall += seconds
            if not stalled or len(stalls) >= stall_retries:
                break
            stalls.append(_tail(_read(results / "console.log"), 3000))

        rc_text = _read(results / "returncode").strip()
        boot_text = _read(results / "boot-seconds").strip()
        return BedResult(
            returncode=int(rc_text) if rc_text and not stalled else None,
            stdout=_read(results / "stdout"),
            stderr=_read(results / "stderr"),
            console_log=_read(results / "console.log"),
            wall_seconds=wall,
            timed_out=timed_out,
            stalled=stalled,
            stalled_boots=stalls,
            bed_error=_read(results / "bed-error").strip() or None,
            boot_seconds=float(boot_text) if boot_text else None,
            qemu_returncode=qemu_rc,
            init_log=_read(results / "init.log"),
        )
    finally:
        if own_dir:
            shutil.rmtree(results, ignore_errors=True)


def qemu_available() -> str | None:
    """Why the bed cannot run on this host, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed"
    return None
