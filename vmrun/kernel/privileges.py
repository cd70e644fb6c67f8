"""Changing who this process is: the prctl calls and identity switch that the launch and
the opener share. Each is one system call away from the kernel; the callers decide when."""

from __future__ import annotations

import ctypes
import functools
import os

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from vmrun.kernel.users import User

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


@functools.cache
def libc() -> ctypes.CDLL:
    # Loaded once: each CDLL makes its own function classes, and the launch calls prctl for
    # every capability.
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, *args: int) -> None:
    if libc().prctl(option, *args, *[0] * (4 - len(args))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def no_new_privs() -> None:
    """After this, no exec of this process or its children can gain privileges (setuid, file caps)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def become(user: User) -> None:
    """Switch this process to `user` for good: groups, gid, then uid (the order the kernel needs)."""
    os.setgroups(list(user.groups))
    os.setgid(user.gid)
    os.setuid(user.uid)


def cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def capability_sets() -> dict[str, int]:
    """This process's capability sets as /proc/self/status shows them."""
    with open("/proc/self/status") as f:
        return {
            name: int(value, 16)
            for name, _, value in (line.partition(":\t") for line in f.read().splitlines())
            if name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        }
