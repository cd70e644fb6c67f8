"""`vmrun ps`, `status` and `stop`: the running VMs, one VM's state, and ending a VM politely.

`stop` escalates: ACPI power button (the guest shuts down cleanly, if it listens), QMP
`quit` (QEMU exits at once, the guest gets no say), SIGTERM (QEMU's own clean exit, for a
QEMU whose monitor does not answer), SIGKILL. Each step is printed as it happens, so a
unit's journal shows which one ended the VM. The VM is gone when its QEMU process is gone
and its lock is free: only then can the same name start again.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import attrs

from vmrun.base import tables
from vmrun.base.errors import VmError
from vmrun.base.sizes import MiB
from vmrun.base.text import printable, printable_lines
from vmrun.control import qmp, state
from vmrun.control.state import Vm

# Shares of --timeout: the guest's own shutdown gets most of it; quit and SIGTERM end
# QEMU within a second when it is healthy, so their shares only matter for a sick QEMU.
POWERDOWN_SHARE = 2 / 3
QUIT_SHARE = 1 / 6
# SIGKILL cannot be refused, but exit can take a while when VFIO unpins a large guest.
KILL_WAIT = 10.0
POLL = 0.05
QMP_CONNECT_MAX = 5.0
CPU_SAMPLE = 0.3
# QEMU run states in which the vCPUs do not run: no guest can react to the power button.
PAUSED_STATES = ("prelaunch", "paused", "suspended", "inmigrate", "postmigrate", "debug", "restore-vm")


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}M"


def short_device(purpose: str) -> str:
    """Driver and id of a device, for one table cell: "vfio-pci gpu0 (host=…)" -> "vfio-pci gpu0"."""
    return purpose.split(" (", 1)[0]


def ps_table(vms: list[Vm], show_state: bool) -> str:
    head = ["NAME", *(["STATE"] if show_state else []), "PID", "USER", "UPTIME", "RSS", "DEVICES"]
    rows = [head]
    for vm in vms:
        p = vm.process
        rows.append(
            [
                vm.name,
                *([vm.state] if show_state else []),
                str(p.pid) if p else "-",
                (p.user or "?") if p else "-",
                duration(p.uptime) if p else "-",
                mib(p.rss) if p else "-",
                ", ".join(short_device(d) for d in vm.devices) or "-",
            ]
        )
    return tables.table([[printable(cell) for cell in row] for row in rows])


def ps(show_all: bool, as_json: bool, names_only: bool, out: TextIO = sys.stdout) -> None:
    vms = [vm for vm in state.all_vms() if show_all or vm.state != "stopped"]
    if names_only:
        out.write("".join(vm.name + "\n" for vm in vms))
    elif as_json:
        out.write(json.dumps([vm.to_json() for vm in vms], indent=2) + "\n")
    else:
        out.write(ps_table(vms, show_all))


@attrs.frozen
class Status:
    vm: Vm
    qmp_status: dict[str, Any] | None  # QEMU's query-status; None when QMP did not answer
    qmp_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.vm.to_json(), "status": self.qmp_status, "qmp_error": self.qmp_error}

    def text(self) -> str:
        vm, p = self.vm, self.vm.process
        assert p is not None
        run_state = self.qmp_status.get("status", "?") if self.qmp_status else "unknown (QMP did not answer)"
        rows = [
            ("state", str(run_state)),
            ("pid", str(p.pid)),
            ("user", p.user or "?"),
            ("uptime", duration(p.uptime)),
            ("rss", mib(p.rss)),
            ("cpu", "-" if p.cpu_percent is None else f"{p.cpu_percent:.1f}%"),
            ("config", vm.config or "-"),
            ("devices", ", ".join(vm.devices) or "-"),
            ("qmp", vm.qmp_socket),
        ]
        # The run state is what answered on QMP: whoever holds QEMU's socket may answer it.
        return f"{vm.name}:\n" + "".join(f"  {k:<8} {printable(v)}\n" for k, v in rows)


def status(name: str) -> Status:
    vm = state.running(name, cpu_interval=CPU_SAMPLE)
    try:
        answer = qmp.execute(vm.qmp_socket, "query-status")
    except VmError as e:
        return Status(vm, None, e.what)
    return Status(vm, answer if isinstance(answer, dict) else {"status": answer})


class Stopper:
    """Ends one running VM, step by step, saying what it does as it does it."""

    def __init__(
        self,
        vm: Vm,
        timeout: float,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert vm.identity is not None
        self.vm = vm
        self.timeout = timeout
        self.say = say
        self.clock = clock
        self.start = clock()
        # Proven to be the VM's QEMU on a pidfd: every signal goes through it, so a pid
        # reused after QEMU exits can never be hit.
        self.pidfd: int | None = state.open_pidfd(vm.identity, vm.identity.lock)
        # Once QMP fails to answer (no greeting: QEMU stopped or hung), later QMP steps
        # would only wait for the same timeout again.
        self.qmp_down: str | None = None

    def process_gone(self) -> bool:
        return self.pidfd is None or state.has_exited(self.pidfd)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def gone(self) -> bool:
        return self.process_gone() and not state.lock_held(self.vm.lock_file)

    def wait(self, seconds: float) -> bool:
        """True when the VM went away within `seconds`."""
        end = self.clock() + seconds
        while True:
            if self.gone():
                return True
            if self.clock() >= end:
                return False
            time.sleep(POLL)

    def elapsed(self) -> str:
        return f"{self.clock() - self.start:.1f} s"

    def qmp(self, step: str, command: str, budget: float) -> tuple[bool, Any]:
        """(sent, QEMU's answer); says why it could not be sent."""
        if self.qmp_down is not None:
            self.say(f"{step}: not sent: {self.qmp_down}")
            return False, None
        try:
            with qmp.Monitor(self.vm.qmp_socket, connect_timeout=min(QMP_CONNECT_MAX, budget)) as m:
                return True, m.execute(command, timeout=max(budget, 1.0))
        except qmp.Closed:
            return True, None  # quit: QEMU may close the socket before its reply arrives
        except VmError as e:
            self.qmp_down = e.what
            self.say(f"{step}: not sent: {e.what}")
            return False, None

    def run_state(self) -> str | None:
        try:
            with qmp.Monitor(self.vm.qmp_socket, connect_timeout=min(QMP_CONNECT_MAX, self.timeout * QUIT_SHARE)) as m:
                answer = m.execute("query-status", timeout=QMP_CONNECT_MAX)
        except qmp.Closed:
            return None
        except VmError as e:
            self.qmp_down = e.what
            return None
        return str(answer.get("status")) if isinstance(answer, dict) else None

    def powerdown(self) -> bool:
        budget = self.timeout * POWERDOWN_SHARE
        run_state = self.run_state()
        if run_state in PAUSED_STATES:
            self.say(f"powerdown: skipped, the guest is {run_state} and cannot see the power button")
            return False
        sent, _ = self.qmp("powerdown", "system_powerdown", budget)
        if not sent:
            return False
        self.say(f"powerdown: ACPI power button pressed, waiting up to {budget:g} s for the guest to shut down")
        if self.wait(budget):
            return True
        self.say(f"powerdown: still running after {budget:g} s")
        return False

    def quit(self) -> bool:
        budget = self.timeout * QUIT_SHARE
        sent, _ = self.qmp("quit", "quit", budget)
        if not sent:
            return False
        self.say(f"quit: QMP quit sent, waiting up to {budget:g} s")
        if self.wait(budget):
            return True
        self.say(f"quit: still running after {budget:g} s")
        return False

    def send(self, sig: signal.Signals, budget: float) -> bool:
        if self.pidfd is None:
            return True
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            return self.wait(budget)
        except PermissionError:
            raise VmError(
                f"cannot send {sig.name} to pid {self.vm.pid}: permission denied",
                "run vmrun stop as the user QEMU runs as, or as root",
            ) from None
        self.say(f"{sig.name}: sent to pid {self.vm.pid}, waiting up to {budget:g} s")
        if self.wait(budget):
            return True
        self.say(f"{sig.name}: still running after {budget:g} s")
        return False

    def done(self, how: str) -> str:
        self.say(f"{self.vm.name} stopped after {self.elapsed()} ({how})")
        return how

    def stop(self) -> str:
        """Runs the steps until one ends the VM; returns the step's name."""
        self.say(f"stopping {self.vm.name} (pid {self.vm.pid}), timeout {self.timeout:g} s")
        steps: list[tuple[str, Callable[[], bool]]] = [
            ("powerdown", self.powerdown),
            ("quit", self.quit),
            ("SIGTERM", lambda: self.send(signal.SIGTERM, self.timeout * QUIT_SHARE)),
            ("SIGKILL", lambda: self.send(signal.SIGKILL, KILL_WAIT)),
        ]
        # A VM that goes away between two steps was ended by the earlier one.
        previous = "by itself"
        for name, step in steps:
            if self.gone():
                return self.done(previous)
            if step():
                return self.done(name)
            previous = name
        if self.process_gone():
            raise VmError(
                f"QEMU of {self.vm.name} has exited, but {self.vm.lock_file} is still locked",
                f"a process QEMU started inherited the lock; `fuser {self.vm.lock_file}` names it",
            )
        raise VmError(
            f"pid {self.vm.pid} of {self.vm.name} is still there {KILL_WAIT:g} s after SIGKILL",
            "it is stuck in the kernel (uninterruptible sleep: a device reset, or unpinning memory); "
            f"see /proc/{self.vm.pid}/stack",
        )


def stop(name: str, timeout: float, out: TextIO = sys.stdout) -> str:
    vm = state.running(name)

    def say(line: str) -> None:
        out.write(printable_lines(line) + "\n")
        out.flush()

    stopper = Stopper(vm, timeout, say)
    try:
        return stopper.stop()
    finally:
        stopper.close()
