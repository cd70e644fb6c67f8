"""Opening what QEMU gets, for a launch and for `vmrun attach` alike: device nodes, images
and firmware (as the VM user, through the opener), and taps.

Every failure is a LaunchError that names the file, what it was for and what to do.
"""

from __future__ import annotations

import errno
import fcntl
import os

from vmrun.base.errors import LaunchError
from vmrun.kernel import ioctls
from vmrun.kernel.opener import Opener, not_an_image

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from vmrun.plan.planner import FdSpec


def open_error(spec: FdSpec, path: str, e: OSError) -> LaunchError:
    assert spec.path is not None
    what = f"cannot open {spec.path} for {spec.purpose}: {e.strerror}"
    hints = {
        errno.ENOENT: "is the device bound to vfio-pci and the kernel built with IOMMUFD and VFIO_DEVICE_CDEV?",
        errno.EACCES: "run vmrun as root: it opens the devices, then runs QEMU as vm.user",
        errno.EPERM: "run vmrun as root: it opens the devices, then runs QEMU as vm.user",
        errno.EBUSY: "another process (a running VM?) holds the device; stop it first",
    }
    return LaunchError(what + (f" ({path})" if path != spec.path else ""), hints.get(e.errno or 0))


def copy_template(template: str, fd: int) -> None:
    """Fill a new variable store from the firmware's template (a system file QEMU's descriptors name)."""
    with open(template, "rb") as src:
        while chunk := src.read(1 << 20):
            os.write(fd, chunk)
    os.lseek(fd, 0, os.SEEK_SET)


def open_file(spec: FdSpec, as_user: Opener) -> int:
    """An image or firmware file, opened with the VM user's rights unless the config trusts it.

    A variable store the config names is created from the template when missing, by the VM
    user too: it is that user's file.
    """
    assert spec.path is not None
    opener = as_user if spec.as_user else Opener(None)
    flags = os.O_RDONLY if spec.flags.startswith("O_RDONLY") else os.O_RDWR
    try:
        if spec.template is not None:
            try:
                fd = opener.open(spec.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                try:
                    copy_template(spec.template, fd)
                except OSError as e:
                    os.close(fd)
                    raise LaunchError(f"cannot make {spec.path} from {spec.template}: {e.strerror}") from None
                return fd
        fd = opener.open(spec.path, flags)
    except OSError as e:
        raise LaunchError(
            f"cannot open {spec.path} for {spec.purpose} as {opener.who}: {e.strerror}",
            f"vmrun opens it with the rights of the user QEMU runs as; give {opener.who} access to it",
        ) from None
    why = not_an_image(fd)
    if why is not None:
        os.close(fd)
        raise LaunchError(f"{spec.path} ({spec.purpose}): {why}")
    if "O_DIRECT" in spec.flags.split("|"):
        # Set after the header was read: O_DIRECT reads need aligned buffers.
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as e:
            os.close(fd)
            raise LaunchError(
                f'{spec.path} ({spec.purpose}): cache = "none" opens it with O_DIRECT, which its file system refuses:'
                f" {e.strerror}",
                'set cache = "writeback" (the default) for this disk, or move the image',
            ) from None
    return fd


def open_tap(spec: FdSpec, host_root: str) -> int:
    """Attach to an existing tap interface, so QEMU needs neither /dev/net/tun nor CAP_NET_ADMIN."""
    assert spec.path is not None and spec.ifname is not None
    fd = os.open(os.path.join(host_root, spec.path.lstrip("/")), os.O_RDWR | os.O_CLOEXEC)
    try:
        ioctls.attach_tap(fd, spec.ifname)
    except OSError as e:
        os.close(fd)
        raise LaunchError(
            f"cannot attach to tap {spec.ifname}: {e.strerror}",
            f"create it for the launching user (ip tuntap add {spec.ifname} mode tap user USER), or run vmrun as root",
        ) from None
    return fd


def open_device(spec: FdSpec, host_root: str) -> int:
    """A device node the config names (a VFIO cdev, /dev/iommu), opened by vmrun: QEMU's
    user may not open it, which is why vmrun passes it."""
    assert spec.path is not None
    path = os.path.join(host_root, spec.path.lstrip("/"))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise open_error(spec, path, e) from None
    if spec.per_process_accounting:
        try:
            ioctls.set_per_process_accounting(fd)
        except OSError as e:
            os.close(fd)
            raise LaunchError(
                f"cannot set per-process memlock accounting on {spec.path} ({spec.purpose}): {e.strerror}",
                "vmrun needs CAP_SYS_RESOURCE for it; run vmrun as root",
            ) from None
    return fd


def open_for_qemu(spec: FdSpec, host_root: str, as_user: Opener) -> int:
    """The fd a planned device, file or tap spec stands for."""
    if spec.kind == "file":
        return open_file(spec, as_user)
    if spec.kind == "tap":
        return open_tap(spec, host_root)
    assert spec.kind == "device", spec.kind
    return open_device(spec, host_root)


def open_fds() -> frozenset[int]:
    """The fds open in this process now: taken first thing, they are the caller's."""
    # The directory's own fd is in the listing, and closed once it is read.
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    still = set()
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue
        still.add(fd)
    return frozenset(still)


def check_caller_fd(spec: FdSpec, command: str, passed: frozenset[int] | None = None) -> None:
    """A config's `fd = N` must be open in vmrun's process: the caller passes it in.

    `passed`: the fds open when vmrun started, when vmrun has opened files of its own
    since (one of them could sit on N and would be taken for the caller's).
    """
    try:
        os.fstat(spec.fd)
        if passed is not None and spec.fd not in passed:
            raise OSError
    except OSError:
        raise LaunchError(
            f"fd {spec.fd} ({spec.purpose}) is not open in vmrun's process",
            f"the caller must pass it open, e.g. `{command} {spec.fd}<>/dev/iommu`",
        ) from None
