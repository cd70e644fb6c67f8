"""What a QEMU binary can do, probed once per binary and cached.

The plan must know, before anything is opened, whether the binary has the iommufd
backend and which properties its vfio devices take: the backend is chosen by the config,
not guessed by QEMU (there is no iommufd=auto). Probing spawns `qemu ... ,help`, which
starts no VM; the answer is cached per binary (path, size, mtime) in vmrun's cache directory
(reader.cache_base: root's own /var/cache/vmrun, the user's XDG cache otherwise).
The probes run as the VM's user (or nobody, when vmrun is root) with the minimal
environment QEMU itself gets: a binary named by a config never runs as root.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import TYPE_CHECKING, Any

import attrs

from vmrun.config.model import DRIVERS
from vmrun.host import reader
from vmrun.host.reader import MINIMAL_PATH
from vmrun.kernel import statedir

if TYPE_CHECKING:
    import subprocess

    from vmrun.kernel.users import User

PROBED_DEVICES = DRIVERS
IOMMUFD_SINCE = (9, 0)
CACHE_VERSION = 5
VFIO_CPR_SINCE = (10, 1, 0)


@attrs.frozen
class QemuCaps:
    path: str
    version: tuple[int, int, int]
    has_iommufd: bool
    # device type -> its property names; a type this binary lacks is absent
    device_props: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    # -sandbox works: QEMU registers the option only when built with seccomp AND the
    # kernel has SECCOMP_FILTER (with TSYNC); its -help lists it either way.
    has_sandbox: bool = True
    # CPR transfer (QEMU 10.0): a new QEMU process takes over guest RAM that is shared
    # memory; its sign is the machine property aux-ram-share that the mode came with.
    has_cpr_transfer: bool = False

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def has_vfio_cpr(self) -> bool:
        """VFIO devices survive CPR transfer from QEMU 10.1 (hw/vfio/cpr-*.c): they have no
        property or schema entry of their own to probe, so the version says it."""
        return self.has_cpr_transfer and self.version >= VFIO_CPR_SINCE

    def cpr_text(self) -> str:
        if not self.has_cpr_transfer:
            return "no cpr-transfer"
        return "cpr-transfer, VFIO CPR" if self.has_vfio_cpr else "cpr-transfer, no VFIO CPR (QEMU 10.1+)"


CACHE_FILE = "qemu-caps.json"


def read_cache() -> dict[str, Any]:
    """The cache as vmrun's user left it: a file of its own, mode 0600, in its own private
    directory (see statedir); anything else is not trusted, and the binary is probed again."""
    base = reader.cache_base(os.geteuid())
    try:
        directory = statedir.open_dir(base, create=False)
    except (OSError, statedir.UnsafeDirectory):
        return {}
    try:
        fd = statedir.open_file(directory, base, CACHE_FILE, os.O_RDONLY)
    except (OSError, statedir.UnsafeDirectory):
        return {}
    finally:
        os.close(directory)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            return {}
        data = os.read(fd, statedir.MAX_RECORD + 1)
        cache = json.loads(data) if len(data) <= statedir.MAX_RECORD else {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return cache if isinstance(cache, dict) else {}


def write_cache(cache: dict[str, Any]) -> None:
    """Replace the cache file, through directory fds (statedir): never through a link."""
    try:
        directory = statedir.open_dir(reader.cache_base(os.geteuid()), create=True, private=True)
    except (OSError, statedir.UnsafeDirectory):
        return  # a read-only home, a directory someone else controls: probe again next time
    try:
        statedir.write_file(directory, CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True).encode(), mode=0o600)
    except OSError:
        pass
    finally:
        os.close(directory)


def run_help(path: str, *args: str, as_user: User | None = None) -> subprocess.Popen[str]:
    import subprocess  # only when the cache has no answer: a launch with a fresh cache spawns nothing

    switch: dict[str, Any] = {}
    env = {"PATH": MINIMAL_PATH, "LC_ALL": "C", "HOME": "/"}
    if as_user is not None and as_user.uid != os.geteuid():
        switch = {"user": as_user.uid, "group": as_user.gid, "extra_groups": list(as_user.groups)}
        env["HOME"] = as_user.home
    return subprocess.Popen(
        [path, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd="/",
        **switch,
    )


def parse_version(text: str) -> tuple[int, int, int]:
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return (0, 0, 0)
    return (int(m[1]), int(m[2]), int(m[3] or 0))


def parse_props(text: str) -> tuple[str, ...]:
    return tuple(sorted({m[1] for m in re.finditer(r"^\s+([A-Za-z0-9_.-]+)=", text, re.M)}))


def probe_uncached(path: str, as_user: User | None = None) -> QemuCaps:
    # All probes at once: each is a short-lived process, so the wall time is one of them.
    version = run_help(path, "-version", as_user=as_user)
    # Options are taken in order: -version exits 0 only after -sandbox was accepted.
    sandbox = run_help(path, "-sandbox", "on", "-version", as_user=as_user)
    iommufd = run_help(path, "-machine", "none", "-object", "iommufd,help", as_user=as_user)
    machine = run_help(path, "-machine", "none,help", as_user=as_user)
    devices = {d: run_help(path, "-machine", "none", "-device", f"{d},help", as_user=as_user) for d in PROBED_DEVICES}
    version_out = version.communicate()[0]
    sandbox.communicate()
    iommufd.communicate()
    machine_props = parse_props(machine.communicate()[0])
    props: dict[str, tuple[str, ...]] = {}
    for name, proc in devices.items():
        found = parse_props(proc.communicate()[0])
        # QEMU exits 0 even for "Device 'x' not found", so an empty list means absent.
        if proc.returncode == 0 and found:
            props[name] = found
    return QemuCaps(
        path=path,
        version=parse_version(version_out),
        has_iommufd=iommufd.returncode == 0,
        device_props=props,
        has_sandbox=sandbox.returncode == 0,
        has_cpr_transfer="aux-ram-share" in machine_props,
    )


def to_json(caps: QemuCaps) -> dict[str, Any]:
    return {
        "path": caps.path,
        "version": list(caps.version),
        "has_iommufd": caps.has_iommufd,
        "device_props": {k: list(v) for k, v in caps.device_props.items()},
        "has_sandbox": caps.has_sandbox,
        "has_cpr_transfer": caps.has_cpr_transfer,
    }


def from_json(data: dict[str, Any]) -> QemuCaps:
    v = data["version"]
    return QemuCaps(
        path=data["path"],
        version=(int(v[0]), int(v[1]), int(v[2])),
        has_iommufd=bool(data["has_iommufd"]),
        device_props={k: tuple(p) for k, p in data["device_props"].items()},
        has_sandbox=bool(data["has_sandbox"]),
        has_cpr_transfer=bool(data["has_cpr_transfer"]),
    )


def probe(binary: str, as_user: User | None = None) -> QemuCaps | None:
    """The capabilities of `binary` (a name on PATH or a path); None when it is not there.

    `as_user`: who runs the probes (vmrun's own user when None).
    """
    found = reader.binary(binary)
    if found is None:
        return None
    path = found["path"]
    _, _, size, mtime_ns, _ = found["id"]
    key = f"{found['real']}:{size}:{mtime_ns}:{CACHE_VERSION}"
    cache = read_cache()
    if key in cache:
        try:
            return attrs.evolve(from_json(cache[key]), path=path)
        except (KeyError, TypeError, ValueError, IndexError):
            pass  # an entry from an older vmrun or a damaged file: probe again
    try:
        caps = probe_uncached(path, as_user)
    except PermissionError:
        return None  # the probing user may not run it; QEMU could not run as that user either
    cache[key] = to_json(caps)
    write_cache(cache)
    return caps
