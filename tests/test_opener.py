"""Files reach QEMU with the VM user's rights: the opener, image chains as nobody, and the
plan's refusals for what an attacker's image or config names.

Each attack is tried for real: root-only files, symlinks to them, qcow2 headers naming
them (as a backing file, a json: or protocol name, an external data file), FIFOs.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import tomli_w

from tests.conftest import FAKE_CAPS, ROOT, is_root
from tests.test_plan import qcow2_header
from vmrun import cli
from vmrun.config import loader
from vmrun.host import facts as host
from vmrun.host.facts import image_facts, lookup_user
from vmrun.kernel.opener import Opener
from vmrun.plan.planner import Plan, plan

pytestmark = pytest.mark.skipif(not is_root(), reason="opening as another user needs root")
NOBODY = lookup_user("nobody")


@pytest.fixture
def world() -> Iterator[pathlib.Path]:
    """A directory nobody can reach, holding a root-only secret."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-opener-"))
    d.chmod(0o755)
    secret = d / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    yield d
    shutil.rmtree(d)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def public(path: pathlib.Path) -> pathlib.Path:
    path.chmod(0o666)
    return path


def plan_as_nobody(directory: pathlib.Path, standard_host: pathlib.Path, **sections: Any) -> Plan:
    vm = {"name": "t", "memory": "64M", "user": "nobody", **sections.pop("vm", {})}
    path = directory / "vm.toml"
    path.write_text(tomli_w.dumps({"vm": vm, **sections}))
    cfg = loader.load(path)
    return plan(cfg, host.gather(cfg, standard_host, qemu_caps=lambda _: FAKE_CAPS, launcher=ROOT))


def problems(p: Plan) -> list[str]:
    return [pr.render() for pr in p.problems]


def test_opener_opens_with_the_users_rights(world: pathlib.Path) -> None:
    assert NOBODY is not None
    (world / "readable").write_text("")
    readable = public(world / "readable")
    with Opener(NOBODY) as opener:
        assert opener.who == "nobody"
        with pytest.raises(PermissionError):
            opener.open(str(world / "secret"), os.O_RDONLY)
        fd = opener.open(str(readable), os.O_RDWR)
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == str(readable)
            assert os.get_blocking(fd) and not os.get_inheritable(fd)
        finally:
            os.close(fd)
        # A symlink is followed as nobody would follow it: to a file nobody may not read.
        (world / "link").symlink_to(world / "secret")
        with pytest.raises(PermissionError):
            opener.open(str(world / "link"), os.O_RDONLY)
        with pytest.raises(FileNotFoundError):
            opener.open(str(world / "missing"), os.O_RDONLY)
    assert opener.pid is None, "the helper child is reaped"


def test_opener_does_not_hang_on_a_fifo(world: pathlib.Path) -> None:
    os.mkfifo(world / "fifo", 0o666)
    facts = image_facts(world / "fifo", Opener(NOBODY))
    assert facts.open_problem == "it is a FIFO, not an image file or block device"


def test_backing_file_named_by_the_header_is_opened_as_the_vm_user(
    world: pathlib.Path, standard_host: pathlib.Path
) -> None:
    # The reproduction: an image whose header names a root-only file as its backing file.
    evil = world / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(world / "secret"), str(evil))
    public(evil)
    p = plan_as_nobody(world, standard_host, disk=[{"id": "d0", "path": str(evil), "format": "qcow2"}])
    assert problems(p) == [
        f"disk[0].path: {evil}: backing file {world}/secret: nobody may not open it: Permission denied"
        " (files an image header names are opened as nobody; fix or flatten the chain"
        " (qemu-img convert -O qcow2 IMAGE FLAT.qcow2))"
    ]
    assert not any(f.path == str(world / "secret") for f in p.fds), "the secret is not even planned"


def test_json_protocol_and_data_file_names_are_refused(world: pathlib.Path, standard_host: pathlib.Path) -> None:
    # qemu-img refuses to write these names; an attacker writes the header by hand.
    json_name = world / "json.qcow2"
    qcow2_header(json_name, f'json:{{"file.filename": "{world}/secret"}}')
    nbd = world / "nbd.qcow2"
    qcow2_header(nbd, "nbd://127.0.0.1:10809/x")
    data_file = world / "data-file.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={world}/external.raw", str(data_file), "1M")
    for image in (json_name, nbd, data_file):
        public(image)
    disks = [{"id": f"d{i}", "path": str(p), "format": "qcow2"} for i, p in enumerate((json_name, nbd, data_file))]
    got = problems(plan_as_nobody(world, standard_host, disk=disks))
    assert len(got) == 3, got
    assert got[0].startswith(f"disk[0].path: {json_name}: the backing file 'json:") and "protocol or json:" in got[0]
    assert got[1].startswith(f"disk[1].path: {nbd}: the backing file 'nbd://127.0.0.1:10809/x' is a protocol")
    assert got[2].startswith(
        f"disk[2].path: {data_file}: {data_file} has an external data file '{world}/external.raw',"
        " which vmrun does not pass"
    )


def test_disk_kernel_and_vars_that_nobody_may_not_open(world: pathlib.Path, standard_host: pathlib.Path) -> None:
    (world / "disk-link").symlink_to(world / "secret")
    (world / "vars-link").symlink_to(world / "secret")
    os.mkfifo(world / "fifo.raw")
    (world / "fifo.raw").chmod(0o666)
    p = plan_as_nobody(
        world,
        standard_host,
        vm={
            "kernel": str(world / "secret"),
            "initrd": str(world / "missing"),
            "firmware": "uefi",
            "uefi_vars": str(world / "vars-link"),
        },
        disk=[{"id": "d0", "path": str(world / "disk-link")}, {"id": "d1", "path": str(world / "fifo.raw")}],
    )
    assert problems(p) == [
        f"vm.kernel: {world}/secret: nobody may not read it: Permission denied"
        " (QEMU opens it as nobody: make it readable for that user)",
        f"vm.initrd: {world}/missing does not exist (fix the path; relative paths start at the config file)",
        f"vm.uefi_vars: {world}/vars-link: nobody may not open it: Permission denied (QEMU writes it as nobody:"
        " give that user read and write access, or drop uefi_vars to use vmrun's own copy)",
        f"disk[0].path: {world}/disk-link: nobody may not open it: Permission denied (vmrun opens disks with the"
        " rights of the user QEMU runs as (nobody): give that user access, or set trusted = true on this disk"
        " if root should open it)",
        f"disk[1].path: {world}/fifo.raw: it is a FIFO, not an image file or block device (vmrun opens disks with"
        " the rights of the user QEMU runs as (nobody): give that user access, or set trusted = true on this disk"
        " if root should open it)",
    ]


def test_trusted_disk_is_opened_by_vmrun_and_says_so(world: pathlib.Path, standard_host: pathlib.Path) -> None:
    top = world / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(world / "secret"), str(top))
    top.chmod(0o600)
    p = plan_as_nobody(world, standard_host, disk=[{"id": "d0", "path": str(top), "format": "qcow2", "trusted": True}])
    assert problems(p) == []
    assert [n.render() for n in p.notes if n.path == "disk[0].trusted"] == [
        f"disk[0].trusted: {top} and its backing files are opened with vmrun's rights, not nobody's"
        " (only for images you control; drop trusted to open them as the VM user)"
    ]
    files = [(f.path, f.as_user) for f in p.fds if f.kind == "file"]
    assert files == [(str(top), False), (str(world / "secret"), False)]


def test_opener_reports_errno_of_the_user(world: pathlib.Path) -> None:
    directory = world / "dir"
    directory.mkdir()
    with Opener(NOBODY) as opener, pytest.raises(OSError) as e:
        opener.open(str(directory), os.O_RDWR)
    assert e.value.errno == errno.EISDIR


def test_check_reports_files_the_vm_user_cannot_read(
    world: pathlib.Path, standard_host: pathlib.Path, fake_qemu: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = {"name": "t", "memory": "64M", "user": "nobody", "qemu": str(fake_qemu), "kernel": str(world / "secret")}
    path = world / "vm.toml"
    path.write_text(tomli_w.dumps({"vm": vm, "disk": [{"id": "d0", "path": str(world / "secret")}]}))
    assert cli.main(["check", str(path), "--host-root", str(standard_host)]) == 1
    out = capsys.readouterr().out
    assert f"fail  vm.kernel     {world}/secret: nobody may not read it: Permission denied" in out
    assert f"fail  disk[0].path  {world}/secret: nobody may not open it: Permission denied" in out


def test_a_vmrun_that_cannot_switch_users_opens_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not root: the plan says vm.user is out of reach; reading facts must not fail on it.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    opener = Opener(NOBODY)
    assert opener.user is None and opener.who == "uid 1000"
