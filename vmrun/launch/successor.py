"""Starting the QEMU that takes a running VM over (`vmrun upgrade`): the launch's steps for a
process of its own.

`vmrun run` becomes QEMU; here the VM runs on, so a child is forked that becomes the new
QEMU. It gets the old QEMU's stdio and the fds the old one holds at the planned numbers,
the memlock limit the old one has now (attach may have raised it), the plan's CPU affinity,
the same user with no way back to privilege, and a session of its own, so nothing that
ends with `vmrun upgrade` ends it. Errors before exec come back through a pipe.
"""

from __future__ import annotations

import fcntl
import os
import sys

from vmrun.base.errors import LaunchError
from vmrun.launch.launcher import close_other_fds, drop_privileges, place_fds, set_cpu_affinity, set_memlock

TYPE_CHECKING = False

if TYPE_CHECKING:
    from vmrun.plan.planner import Plan


def start(plan: Plan, argv: list[str], fds: dict[int, int], stdio: tuple[int, int, int], memlock: int | None) -> int:
    """Fork and exec the new QEMU with `fds` ({number in QEMU: fd here}); its pid, once
    exec has succeeded. The fds here stay open: the caller closes them."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: never returns into vmrun
        out = write_end
        try:
            os.close(read_end)
            os.setsid()
            for target, fd in enumerate(stdio):
                os.dup2(fd, target, inheritable=True)
            # The pipe's write end must survive place_fds and close_other_fds: above every
            # planned number, close-on-exec, so the parent reads EOF once exec succeeded.
            out = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, max([*fds, 2]) + 64)
            place_fds({number: os.dup(fd) for number, fd in fds.items()}, [])
            set_memlock(memlock)
            set_cpu_affinity(plan, lambda message: None)
            drop_privileges(plan)
            close_other_fds({0, 1, 2, out, *fds})
            os.execve(argv[0], argv, dict(plan.env))
        except LaunchError as e:
            report(out, str(e))
        except OSError as e:
            report(out, f"cannot execute {argv[0]}: {e.strerror}")
        except BaseException as e:
            report(out, f"{type(e).__name__}: {e}")
        os._exit(127)
    os.close(write_end)
    try:
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    if chunks:
        os.waitpid(pid, 0)
        raise LaunchError(f"the new QEMU did not start: {b''.join(chunks).decode(errors='replace')}")
    return pid


def report(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
    except OSError:
        print(message, file=sys.stderr)
