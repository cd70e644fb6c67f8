"""Taking an fd out of another process through its pidfd (pidfd_getfd, Linux 5.6).

`vmrun upgrade` gives the new QEMU the very files the old one holds (its lock, its listening
sockets, taps, device and image fds): the same open file descriptions, so a lock stays held
and a single-queue tap stays attached across the switch. It needs ptrace rights over the
process, which root has and the VM's own user has over its QEMU.
"""

from __future__ import annotations

import ctypes
import os

from vmrun.kernel.privileges import libc

# The generic syscall table's number: the same on x86_64 and arm64.
SYS_PIDFD_GETFD = 438


def getfd(pidfd: int, target: int) -> int:
    """A new fd (close-on-exec) on what fd `target` of the pidfd's process is open on."""
    fd = int(libc().syscall(SYS_PIDFD_GETFD, pidfd, target, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd of fd {target}: {os.strerror(err)}")
    return fd
