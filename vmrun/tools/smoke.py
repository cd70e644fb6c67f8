"""`vmrun smoke`: launch each config as `vmrun run` would and check over QMP that QEMU
made what the config declares, for CI.

The VM is started by `vmrun run --paused` as a child process, so the launch is the real
one (plan, fds, limits, identity, lock) and the guest runs no instruction until told:
every `[[vfio]]` device must be realised under its id and every `[[iommufd]]` object must
exist. With a boot pattern the CPUs are then started and the serial console (the child's
stdout, or vmrun's console socket) must show a matching line in time. The child is always
ended, killed if need be.
"""

from __future__ import annotations

import contextlib
import os
import platform
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import IO, Any

import attrs

from vmrun.base import layout
from vmrun.base.errors import ConfigError, VmError
from vmrun.base.text import printable, printable_lines
from vmrun.config import loader
from vmrun.config.model import Config
from vmrun.control import qmp, state
from vmrun.host.facts import Host
from vmrun.tools import smoke_schedule

QUIT_WAIT = 5.0
TAIL = 20  # lines of console and stderr kept for a report


@attrs.frozen
class Result:
    config: str
    ok: bool
    reason: str  # why it failed; what was verified when it passed
    seconds: float
    console: str = ""
    stderr: str = ""

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.config}: {self.reason} ({self.seconds:.1f} s)"


class Failed(Exception):
    pass


def pci_ids(buses: Iterable[Any]) -> set[str]:
    """Every qdev id in a query-pci answer, behind bridges too."""
    ids: set[str] = set()
    for bus in buses:
        for dev in bus.get("devices", ()):
            if dev.get("qdev_id"):
                ids.add(dev["qdev_id"])
            bridge = dev.get("pci_bridge")
            if bridge and "bus" in bridge:
                ids |= pci_ids([{**bridge["bus"], "devices": bridge.get("devices", ())}])
    return ids


@attrs.frozen
class Expected:
    """What QEMU must have made, by id: devices with their QEMU type, objects with their QOM type."""

    devices: tuple[tuple[str, str], ...] = ()
    objects: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, cfg: Config) -> Expected:
        return cls(tuple((d.id, d.driver) for d in cfg.vfio), tuple((o.id, "iommufd") for o in cfg.iommufd))

    def summary(self) -> str:
        if not self.devices and not self.objects:
            return "QEMU started, nothing declared to verify"
        return f"verified {plural(len(self.devices), 'vfio device')} and {plural(len(self.objects), 'iommufd object')}"


def verify(m: qmp.Monitor, expected: Expected, deadline: float) -> None:
    """Checks over QMP that QEMU made every expected device and object; Failed says what lacks."""

    def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
        return m.execute(command, arguments, timeout=max(0.1, deadline - time.monotonic()))

    missing = []
    on_pci = pci_ids(execute("query-pci")) if expected.devices else set()
    for dev_id, driver in expected.devices:
        if dev_id in on_pci:
            continue
        # Not on a bus that query-pci lists: not a PCI device, or behind a bridge whose bus
        # the firmware has not numbered yet (always so while the VM is paused before boot).
        # QOM has every device that has an id under /machine/peripheral.
        path = f"/machine/peripheral/{dev_id}"
        try:
            kind = execute("qom-get", {"path": path, "property": "type"})
        except qmp.CommandFailed as e:
            missing.append(f"{driver} {dev_id} does not exist ({e.desc})")
            continue
        if kind != driver:
            missing.append(f"{dev_id} is a {kind}, not a {driver}")
        elif execute("qom-get", {"path": path, "property": "realized"}) is not True:
            missing.append(f"{driver} {dev_id} is not realized")
    if expected.objects:
        objects = {o["name"]: o.get("type", "") for o in execute("qom-list", {"path": "/objects"})}
        for obj_id, qom_type in expected.objects:
            if obj_id not in objects:
                missing.append(f"{qom_type} object {obj_id} does not exist")
            elif objects[obj_id] != f"child<{qom_type}>":
                missing.append(f"object {obj_id} is a {objects[obj_id]}, not a child<{qom_type}>")
    if missing:
        raise Failed("; ".join(missing))


def plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def open_fds(fds: Iterable[int]) -> list[int]:
    """Those of `fds` open here. Popen fails on a closed one; `vmrun run` says which is missing."""
    out = []
    for fd in sorted(fds):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.append(fd)
    return out


class Child:
    """`vmrun run --paused FILE` as a child, its console and stderr read as they come."""

    def __init__(self, file: str, console_on_stdout: bool, state_base: str, caller_fds: Iterable[int] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmrun.cli", "run", "--paused", file],
            env={**os.environ, "VMRUN_STATE_DIR": state_base},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # The fds our caller opened for the config (fd = N) must reach `vmrun run`.
            pass_fds=open_fds(caller_fds),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.console: list[str] = []
        self.errors: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.readers = [
            threading.Thread(
                target=self.read,
                args=(self.proc.stdout, self.console, self.lines if console_on_stdout else None),
                daemon=True,
            ),
            threading.Thread(target=self.read, args=(self.proc.stderr, self.errors, None), daemon=True),
        ]
        for t in self.readers:
            t.start()
        self.console_socket: socket.socket | None = None

    def attach_console(self, path: str) -> None:
        """Read the serial console from vmrun's console socket (vm.console = "socket").

        QEMU drops what the serial port says while no client is connected: attach before `cont`.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise Failed(f"cannot connect to the console socket {path}: {e.strerror}") from None
        self.console_socket = sock
        reader = threading.Thread(target=self.read, args=(sock.makefile("rb"), self.console, self.lines), daemon=True)
        reader.start()
        self.readers.append(reader)

    @staticmethod
    def read(stream: IO[bytes], keep: list[str], lines: queue.Queue[str | None] | None) -> None:
        """Collects lines; also hands on a line still being written, for prompts ("login: ")
        that end without a newline until someone answers them."""
        partial = b""
        while chunk := os.read(stream.fileno(), 4096):
            *complete, partial = (partial + chunk).split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").rstrip("\r")
                keep.append(line)
                del keep[:-TAIL]
                if lines is not None:
                    lines.put(line)
            if partial and lines is not None:
                lines.put(partial.decode(errors="replace"))
        if partial:
            keep.append(partial.decode(errors="replace"))
            del keep[:-TAIL]
        if lines is not None:
            lines.put(None)

    def exited(self) -> str | None:
        """Why the child is gone, or None while it runs."""
        status = self.proc.poll()
        if status is None:
            return None
        for t in self.readers:
            t.join(timeout=1)
        said = " ".join(line.strip() for line in self.errors if line.strip())
        how = f"exit status {status}" if status >= 0 else f"signal {-status}"
        return f"vmrun run ended ({how})" + (f": {said}" if said else "")

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.console_socket is not None:
            self.console_socket.close()
        for t in self.readers:
            t.join(timeout=1)


def connect(child: Child, name: str, state_base: str, deadline: float) -> tuple[qmp.Monitor, state.Vm]:
    """The child's QMP session, once vmrun has recorded it as the VM's QEMU."""
    last_error = ""
    while True:
        why = child.exited()
        if why is not None:
            raise Failed(why)
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failed("QMP did not answer in time" + (f" ({last_error})" if last_error else ""))
        vm = state.load(name, state_base)
        # A socket file from an earlier run refuses; this run's is ours once the pid is the child's.
        if vm is not None and vm.state == "running" and vm.pid == child.proc.pid:
            try:
                m = qmp.Monitor(vm.qmp_socket, connect_timeout=left)
                m.connect()
                return m, vm
            except qmp.QmpError as e:
                last_error = e.what
        time.sleep(0.02)


def wait_for_line(child: Child, pattern: re.Pattern[str], deadline: float) -> float:
    start = time.monotonic()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            last = next((line for line in reversed(child.console) if line.strip()), None)
            raise Failed(
                f"no console line matched {pattern.pattern!r} in time" + (f" (last line: {last!r})" if last else "")
            )
        try:
            line = child.lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            try:
                status = child.proc.wait(timeout=QUIT_WAIT)
            except subprocess.TimeoutExpired:
                raise Failed("the serial console closed before a line matched") from None
            raise Failed(f"QEMU exited (status {status}) before a console line matched")
        if pattern.search(line):
            return time.monotonic() - start


def smoke_one(file: str, timeout: float, boot: re.Pattern[str] | None) -> Result:
    """One config smoke-tested with a state directory of its own: configs running side by
    side (or a VM of the same name already running) never share a lock or a socket."""
    state_base = tempfile.mkdtemp(prefix="vmrun-smoke-")
    try:
        return smoke_in(file, timeout, boot, state_base)
    finally:
        shutil.rmtree(state_base, ignore_errors=True)


def smoke_in(file: str, timeout: float, boot: re.Pattern[str] | None, state_base: str) -> Result:
    start = time.monotonic()
    deadline = start + timeout

    def result(ok: bool, reason: str, child: Child | None = None) -> Result:
        return Result(
            config=file,
            ok=ok,
            reason=reason,
            seconds=time.monotonic() - start,
            console="\n".join(child.console) if child else "",
            stderr="\n".join(child.errors) if child else "",
        )

    try:
        cfg = loader.load(file)
    except ConfigError as e:
        return result(False, "config: " + "; ".join(e.lines()))
    name = cfg.vm.name
    console = cfg.vm.console
    if boot is not None and console not in ("stdio", "socket"):
        return result(False, f'vm.console is "{console}": no serial console to match --boot against')
    child = Child(file, console_on_stdout=console == "stdio", state_base=state_base, caller_fds=cfg.caller_fds())
    try:
        m, vm = connect(child, name, state_base, deadline)
        try:
            expected = Expected.of(cfg)
            verify(m, expected, deadline)
            verified = expected.summary()
            if boot is not None:
                if console == "socket":
                    child.attach_console(os.path.join(vm.state_dir, layout.CONSOLE_SOCKET))
                m.execute("cont", timeout=max(0.1, deadline - time.monotonic()))
        finally:
            m.close()
        if boot is not None:
            after = wait_for_line(child, boot, deadline)
            verified += f"; console matched {boot.pattern!r} {after:.1f} s after cont"
        return result(True, verified, child)
    except Failed as e:
        return result(False, str(e), child)
    except qmp.QmpError as e:
        return result(False, f"QMP: {e.what}", child)
    finally:
        quit_child(child, name, state_base)
        child.end()


def quit_child(child: Child, name: str, state_base: str) -> None:
    """QMP quit, so QEMU exits cleanly; end() kills whatever does not."""
    if child.proc.poll() is not None:
        return
    vm = state.load(name, state_base)
    if vm is not None and vm.pid == child.proc.pid:
        with contextlib.suppress(qmp.QmpError), qmp.Monitor(vm.qmp_socket, connect_timeout=2.0) as m:
            m.execute("quit", timeout=2.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(timeout=QUIT_WAIT)


def junit(results: list[Result], total_seconds: float) -> bytes:
    failures = sum(not r.ok for r in results)
    attrs_ = {"name": "vmrun smoke", "tests": str(len(results)), "failures": str(failures), "errors": "0"}
    suites = ET.Element("testsuites", {**attrs_, "time": f"{total_seconds:.3f}"})
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            **attrs_,
            "skipped": "0",
            "time": f"{total_seconds:.3f}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "hostname": platform.node(),
        },
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", {"classname": "vmrun.smoke", "name": r.config, "time": f"{r.seconds:.3f}"}
        )
        # The guest wrote the console and QEMU the stderr: escaped, they are text XML may hold.
        if not r.ok:
            failure = ET.SubElement(case, "failure", {"message": printable(r.reason), "type": "SmokeFailure"})
            failure.text = printable_lines(r.reason)
        if r.console:
            ET.SubElement(case, "system-out").text = printable_lines(r.console)
        if r.stderr:
            ET.SubElement(case, "system-err").text = printable_lines(r.stderr)
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True)) + b"\n"


def run(
    files: list[str],
    timeout: float,
    boot: re.Pattern[str] | None,
    junit_path: str | None,
    say: Callable[[str], None],
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Smoke-tests `files`, `jobs` at a time. Each result is said as soon as every config
    before it is done, so the lines (and the JUnit report) keep the order of `files`;
    `progress` hears of each config the moment it finishes. One failing never stops the rest;
    configs that need the same host device, image, tap or port never run at once."""
    start = time.monotonic()
    results: list[Result | None] = [None] * len(files)
    said = 0
    host_view = Host("/")
    claimed = [smoke_schedule.claims(f, host_view) for f in files] if jobs > 1 else [frozenset()] * len(files)

    def work(k: int) -> Result:
        try:
            return smoke_one(files[k], timeout, boot)
        except Exception as e:  # one config's trouble must not take the others down
            return Result(files[k], False, f"vmrun smoke failed: {e!r}", 0.0)

    for done, (k, result) in enumerate(smoke_schedule.run_exclusive(len(files), claimed, jobs, work), 1):
        results[k] = result
        if progress is not None:
            progress(f"smoke: [{done}/{len(files)}] {result.line()}")
        while said < len(files) and (r := results[said]) is not None:
            say(r.line())
            said += 1
    finished = [r for r in results if r is not None]
    failed = sum(not r.ok for r in finished)
    wall = time.monotonic() - start
    say(f"smoke: {len(finished) - failed} passed, {failed} failed in {wall:.1f} s (-j {max(1, jobs)})")
    if junit_path is not None:
        data = junit(finished, wall)
        tmp = f"{junit_path}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, junit_path)
        except OSError as e:
            raise VmError(f"cannot write {junit_path}: {e.strerror}", "give --junit a writable path") from None
    return finished
