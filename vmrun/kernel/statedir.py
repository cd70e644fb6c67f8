"""vmrun's own directories (running VMs' state, per-VM data, bind records), used only
through directory fds.

vmrun runs as root and writes there: a symlink planted in place of a directory or a file
would make it create, truncate or hand to QEMU a file of the attacker's choosing. So the
base is opened with O_NOFOLLOW and must belong to vmrun's user and be writable by nobody
else; each directory below it likewise; every file is opened relative to its directory's
fd with O_NOFOLLOW (and O_NONBLOCK: a FIFO must not hang vmrun) and checked to be a
regular file of ours with no other name (a hard link would be a file elsewhere); writes go
to an O_EXCL temp file in the same directory, renamed over the target. Unix sockets are
bound through /proc/self/fd/DIR/NAME. Nothing here follows a symlink it did not create.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from vmrun.base import trust
from vmrun.base.errors import Failure
from vmrun.base.layout import SUN_PATH_MAX

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from vmrun.kernel.users import User

MAX_RECORD = 1 << 20  # state.json, bind records: far smaller in practice
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectory(Failure):
    """A directory or file of vmrun's that it will not trust: a symlink, another owner, writable by others."""


def describe_mode(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def not_a_directory(path: str, parent: int | None, name: str) -> UnsafeDirectory:
    """The error for `name` (under the directory fd `parent`, or the path `name`) that
    O_DIRECTORY|O_NOFOLLOW refused: a symlink, or something that is not a directory."""
    hint = f"remove it (rm {path}); vmrun makes the directory itself"
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False) if parent is not None else os.lstat(name)
    except OSError:
        return UnsafeDirectory(f"{path} is not a directory", hint)
    if stat.S_ISLNK(st.st_mode):
        return UnsafeDirectory(f"{path} is a symlink: vmrun does not follow links in its own directories", hint)
    return UnsafeDirectory(f"{path} is not a directory ({describe_mode(st)})", hint)


def check_ours(fd: int, path: str, private: bool) -> None:
    """The directory at `fd` belongs to vmrun's user and no one else may write into it."""
    st = os.fstat(fd)
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafeDirectory(
            f"{path} belongs to uid {st.st_uid}, not to vmrun's user (uid {me}): {describe_mode(st)}",
            f"remove it (rm -r {path}) so vmrun makes its own",
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UnsafeDirectory(
            f"{path} may be written by others: {describe_mode(st)}",
            f"chmod go-w {path}",
        )
    if private and stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o700)  # ours, and nobody else could write it: just close it to others


def open_parent(path: str, create: bool) -> int:
    """A directory fd on `path`, a directory above one of vmrun's own, judged by the trust
    rule (trust.py: every component owned by root or vmrun's user, none writable by others
    unless sticky, links followed only when so owned); made (0755) when missing and `create`."""
    try:
        fd, _ = trust.open_directory(path, os.geteuid())
        return fd
    except FileNotFoundError:
        if not create or path == "/":
            raise
    except trust.NotRegular:
        raise UnsafeDirectory(f"{path} is not a directory", f"vmrun keeps its directories under {path}") from None
    except trust.Refused as e:
        raise UnsafeDirectory(f"{path}: {e.message}", e.hint) from None
    above, name = os.path.split(path)
    parent = open_parent(above or "/", create)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
    finally:
        os.close(parent)
    return open_parent(path, create=False)


def open_dir(path: str, create: bool, mode: int = 0o700, private: bool = False) -> int:
    """An fd on the directory `path` (made with `mode` when missing and `create`), checked:
    its own, not a link, writable by no one else; every directory above it passes the trust
    rule and is made, through directory fds, when missing."""
    # A trailing slash would make the kernel follow a symlink despite O_NOFOLLOW.
    path = os.path.abspath(path.rstrip("/") or "/")
    above, name = os.path.split(path)
    if not name:  # / itself: never vmrun's own
        raise UnsafeDirectory("/ cannot be one of vmrun's directories", "set VMRUN_STATE_DIR to a directory of its own")
    parent = open_parent(above, create)
    try:
        return open_below(parent, path, name, create, mode, private)
    finally:
        os.close(parent)


def user_dir(parent: int, name: str, owner: User | None) -> int:
    """The directory `name` under the directory fd `parent`, made when missing (never through
    a link) and given to `owner` (QEMU's user) alone, mode 0700: where QEMU makes sockets by
    path while the directory above stays vmrun's."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    try:
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_subdir(parent: int, parent_path: str, name: str, create: bool) -> int:
    """An fd on `name` under the directory fd `parent`: private (0700) and ours."""
    path = os.path.join(parent_path, name)
    if name in ("", ".", "..") or "/" in name:
        raise UnsafeDirectory(f"{path} is not a directory of its own under {parent_path}")  # callers pass VM names
    return open_below(parent, path, name, create, 0o700, private=True)


def open_below(parent: int, path: str, name: str, create: bool, mode: int, private: bool) -> int:
    """The directory `name` (at `path`) under the directory fd `parent`, made with `mode` when
    missing and `create`; never through a link, and checked to be ours."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise not_a_directory(path, parent, name) from None
        raise
    try:
        check_ours(fd, path, private)
    except BaseException:
        os.close(fd)
        raise
    return fd


FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symlink",
}


def not_ours(path: str, st: os.stat_result) -> UnsafeDirectory:
    """The error for what is at `path` in place of a regular file of vmrun's with one name."""
    hint = f"remove it (rm {path})"
    kind = FILE_TYPES.get(stat.S_IFMT(st.st_mode))
    if kind == "a symlink":
        return UnsafeDirectory(f"{path} is a symlink: vmrun does not follow links in its own directories", hint)
    if kind is not None:
        what = f"not a regular file but {kind}"
    elif st.st_nlink != 1:
        what = f"a regular file with {st.st_nlink} hard links"
    else:
        what = "a regular file of another user"
    return UnsafeDirectory(f"{path} is {what} ({describe_mode(st)}): not one vmrun made", hint)


def open_file(directory: int, dir_path: str, name: str, flags: int, mode: int = 0o600) -> int:
    """A regular file of ours in `directory`: never through a symlink, never hanging on a
    FIFO, never one with other names (a hard link to a file elsewhere)."""
    path = os.path.join(dir_path, name)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode, dir_fd=directory)
    except OSError as e:
        # ELOOP for a symlink, ENXIO for a socket, EISDIR for a directory opened to write,
        # ENODEV for a device without a driver: what is there is not a file vmrun made.
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EOPNOTSUPP):
            raise
        try:
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except OSError:
            raise UnsafeDirectory(f"cannot open {path}", f"remove it (rm {path})") from None
        raise not_ours(path, st) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise not_ours(path, st)
    os.set_blocking(fd, True)
    return fd


def read_file(directory: int, dir_path: str, name: str, limit: int = MAX_RECORD) -> bytes | None:
    """The content of a small file of ours, None when it is missing."""
    try:
        fd = open_file(directory, dir_path, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeDirectory(f"{os.path.join(dir_path, name)} is larger than {limit} bytes: not one vmrun wrote")
    return data


def write_file(directory: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `name` in `directory` at once: a new file, never one a link points to."""
    # What secrets.token_hex does, without the modules `secrets` brings along (random, hmac, base64).
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=directory)
        raise


def remove(directory: int, name: str, inode: int | None = None) -> None:
    """Unlink `name` (the entry itself, never what a link names); with `inode`, only that file.

    With `inode`, a stat before the unlink would leave a window in which a launch replaces
    the file and the fresh one is unlinked. So the entry is first renamed to a name of our
    own, looked at there, and put back (by link, which never replaces) when it is not the
    file judged.
    """
    if inode is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=directory)
        return
    aside = f".{name}.{os.urandom(8).hex()}.old"
    try:
        os.rename(name, aside, src_dir_fd=directory, dst_dir_fd=directory)
    except FileNotFoundError:
        return
    try:
        if os.stat(aside, dir_fd=directory, follow_symlinks=False).st_ino != inode:
            # Replaced meanwhile (a launch wrote a fresh one): put it back, unless an even
            # fresher one is there by now.
            with contextlib.suppress(FileExistsError):
                os.link(aside, name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
    finally:
        os.unlink(aside, dir_fd=directory)


def listen_unix(directory: int, dir_path: str, name: str, backlog: int = 4) -> int:
    """A listening unix socket `name` in `directory`; its real path must fit sun_path."""
    path = os.path.join(dir_path, name)
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise UnsafeDirectory(
            f"the socket path {path} is {len(os.fsencode(path))} bytes, over the {SUN_PATH_MAX - 1} a unix socket"
            " path may have",
            "use a shorter vm.name or a shorter state directory (VMRUN_STATE_DIR)",
        )
    remove(directory, name)  # what is left there is from a VM that is gone: the caller holds the lock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bound through the directory fd: no component of the path can be swapped meanwhile.
        sock.bind(f"/proc/self/fd/{directory}/{name}")
        os.chmod(name, 0o600, dir_fd=directory)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def open_data_copy(data_base: str, vm_name: str, filename: str, template: str) -> int:
    """`<data_base>/<vm_name>/<filename>` opened read-write, made from `template` when missing.

    For vmrun's own per-VM files (the default UEFI variable store): the directories are
    checked as the state directory is, the copy goes through an O_EXCL temp file.
    """
    base = open_dir(data_base, create=True, mode=0o755)
    try:
        vm_dir = open_subdir(base, data_base, vm_name, create=True)
    finally:
        os.close(base)
    dir_path = os.path.join(data_base, vm_name)
    try:
        try:
            return open_file(vm_dir, dir_path, filename, os.O_RDWR)
        except FileNotFoundError:
            pass
        with open(template, "rb") as src:
            write_file(vm_dir, filename, src.read(), mode=0o600)
        return open_file(vm_dir, dir_path, filename, os.O_RDWR)
    finally:
        os.close(vm_dir)
