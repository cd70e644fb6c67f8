"""A running VM's state directory, `<state base>/NAME/`: the names of what it holds and the
shape of the device entries in its record (state.json). The launch writes them, running
VMs' control and `vmrun smoke` read them, the plan names their paths: this is the one
place that spells them.

On the kept-plan launch's path: no attrs, no typing.
"""

from __future__ import annotations

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    pass

RECORD = "state.json"  # what the launch recorded: pid, start time, binary, lock, devices, attached
LOCK = "lock"  # flock'ed by vmrun and inherited by QEMU: the VM's name is taken while held
PID = "pid"  # QEMU's pid, written last
QMP_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"  # vm.console = "socket"
VNC_DIR = "vnc"  # holds VNC_SOCKET, QEMU's own directory
VNC_SOCKET = "vnc.sock"
PLANS = ".plans"  # kept plans, beside the VMs: a VM name cannot start with a dot
# struct sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
SUN_PATH_MAX = 108


def device_entry(driver: str, ident: str, source: str, backend: str) -> dict[str, str]:
    """A passed-through device as the record keeps it, for `vmrun ps` and `status`; one that
    `vmrun attach` added has "attached" too."""
    return {"driver": driver, "id": ident, "source": source, "backend": backend}


def is_attached(entry: object) -> bool:
    return isinstance(entry, dict) and bool(entry.get("attached"))


def device_label(entry: object) -> str:
    """ "vfio-pci gpu0 (host=0000:01:00.0, iommufd0)" from a record's device entry."""
    if isinstance(entry, dict):
        attached = ", attached" if entry.get("attached") else ""
        return f"{entry.get('driver')} {entry.get('id')} ({entry.get('source')}, {entry.get('backend')}{attached})"
    return str(entry)
