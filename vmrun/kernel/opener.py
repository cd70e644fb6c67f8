"""The one way vmrun opens a file for QEMU: with the rights of the user QEMU runs as.

vmrun runs as root, QEMU as `vm.user`. Every file that reaches QEMU because a config or
a file's own content names it (a disk, a backing file from an image header, UEFI vars)
must be one that user could open itself; otherwise root would hand QEMU a file it may not
read, a confused deputy. So a short-lived child switches to that user (groups, gid, uid,
no_new_privs), opens each path it is sent and passes the fd back over a socketpair
(SCM_RIGHTS). The kernel decides, with the user's credentials, every component of the
path included: symlinks are followed as that user would follow them.

Only the files a config marks as trusted (`[[disk]] trusted = true`) are opened with
vmrun's own rights, by `Opener(None)`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
from types import TracebackType

from vmrun.kernel.privileges import become, no_new_privs

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from vmrun.kernel.users import User

_REPLY = struct.Struct("=i")  # errno of the open, 0 with an fd attached


class OpenerError(OSError):
    """The child that opens files as the VM user could not be set up (or died): callers see
    an OSError like any refused open, and report it at the key path."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)


def describe_type(mode: int) -> str:
    kinds = {
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFDIR: "a directory",
        stat.S_IFLNK: "a symlink",
    }
    return kinds.get(stat.S_IFMT(mode), "not a regular file")


def not_an_image(fd: int) -> str | None:
    """Why what `fd` opened cannot be a disk image (QEMU takes regular files and block devices)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    return f"it is {describe_type(mode)}, not an image file or block device"


class Opener:
    """Opens paths as `user`; None (or vmrun already being that user) opens with vmrun's own rights.

    Use as a context manager: the child lives until `close`.
    """

    def __init__(self, user: User | None) -> None:
        # Only root can switch; a vmrun of another user cannot run QEMU as `user` at all,
        # which the plan reports (vm.user), so its facts are read with its own rights.
        me = os.geteuid()
        self.user = user if user is not None and user.uid != me and me == 0 else None
        self.sock: socket.socket | None = None
        self.pid: int | None = None

    @property
    def who(self) -> str:
        """Whose rights the opens use, for messages."""
        if self.user is not None:
            return self.user.name
        return "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"

    def __enter__(self) -> Opener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        assert self.user is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, reported through the socket
            parent.close()
            serve(child, self.user)
        child.close()
        self.sock, self.pid = parent, pid
        return parent

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """An fd on `path`, opened as the user; raises OSError as open(2) would for that user."""
        # Never a controlling terminal for vmrun, never a hang on a FIFO; callers check the type.
        flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        if self.user is None:
            fd = os.open(path, flags, mode)
        else:
            sock = self.start()
            sock.send(json.dumps({"path": path, "flags": flags, "mode": mode}).encode())
            data, fds, _, _ = socket.recv_fds(sock, _REPLY.size, 1, socket.MSG_CMSG_CLOEXEC)
            if len(data) != _REPLY.size:
                raise OpenerError(f"the helper that opens files as {self.who} exited")
            (err,) = _REPLY.unpack(data)
            if err:
                for fd in fds:
                    os.close(fd)
                raise OSError(err, os.strerror(err), path)
            if len(fds) != 1:
                raise OpenerError(f"the helper that opens files as {self.who} sent no fd for {path}")
            fd = fds[0]
            os.set_inheritable(fd, False)  # nothing but QEMU, at its planned number, inherits it
        # Blocking again for QEMU; O_NONBLOCK only guarded the open itself.
        os.set_blocking(fd, True)
        return fd

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the child sees EOF and exits
            self.sock = None
        if self.pid is not None:
            os.waitpid(self.pid, 0)
            self.pid = None


def serve(sock: socket.socket, user: User) -> None:  # pragma: no cover - child process
    """The child: become the user, then open what is asked until the parent hangs up."""
    status = 0
    try:
        become(user)
        no_new_privs()
        while True:
            request = sock.recv(65536)
            if not request:
                break
            try:
                ask = json.loads(request)
                fd = os.open(ask["path"], int(ask["flags"]), int(ask["mode"]))
            except OSError as e:
                sock.send(_REPLY.pack(e.errno or errno.EIO))
                continue
            except (ValueError, KeyError, TypeError):
                sock.send(_REPLY.pack(errno.EINVAL))
                continue
            socket.send_fds(sock, [_REPLY.pack(0)], [fd])
            os.close(fd)
    except BaseException:
        status = 1
    finally:
        os._exit(status)
