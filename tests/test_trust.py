"""The trust rule (vmrun/base/trust.py) for every file that steers vmrun as root: a config, its
drop-in directory and drop-ins, and the plan cache's key, which reads them as the loader
does. (Fragments: tests/test_attach.py.) Each test plays the other local user, `mallory`,
who wants root to hand QEMU a file of theirs or a root-only one."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.conftest import LocalUsers
from vmrun.base import trust
from vmrun.base.errors import ConfigError
from vmrun.config import loader
from vmrun.host import qemu_caps, reader
from vmrun.launch import plan_cache

# What mallory wants root to do: open /etc/shadow for QEMU.
LOOT = '[[disk]]\nid = "loot"\npath = "/etc/shadow"\ntrusted = true\n'
VM = '[vm]\nname = "web"\nmemory = "64M"\n'


@pytest.fixture
def base() -> Iterator[pathlib.Path]:
    """A directory every local user can reach (pytest's own are 0700), owned by root."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-trust-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def put(path: pathlib.Path, text: str, uid: int = 0, gid: int = 0, mode: int = 0o644) -> pathlib.Path:
    path.write_text(text)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def directory(path: pathlib.Path, uid: int = 0, gid: int = 0, mode: int = 0o755) -> pathlib.Path:
    path.mkdir()
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def link(path: pathlib.Path, target: str, uid: int = 0) -> pathlib.Path:
    path.symlink_to(target)
    os.chown(path, uid, uid, follow_symlinks=False)
    return path


def loads_loot(cfg: pathlib.Path) -> bool:
    """Whether the config as vmrun reads it has mallory's disk; False when it is refused."""
    try:
        return any(d.id == "loot" for d in loader.load(cfg).disk)
    except ConfigError:
        return False


def refusal(cfg: pathlib.Path) -> str:
    with pytest.raises(ConfigError) as e:
        loader.load(cfg)
    return str(e.value)


@pytest.fixture
def owned_config(base: pathlib.Path, local_users: LocalUsers) -> pathlib.Path:
    """`owner`'s config in `owner`'s directory, with a drop-in directory of theirs."""
    uid = local_users.uid(local_users.owner)
    home = directory(base / "owner", uid, uid)
    cfg = put(home / "web.toml", VM, uid, uid)
    directory(home / "web.toml.d", uid, uid)
    return cfg


def test_a_dropin_of_another_user_is_refused_naming_owner_mode_and_fix(
    owned_config: pathlib.Path, local_users: LocalUsers
) -> None:
    mallory, owner = local_users.uid(local_users.mallory), local_users.uid(local_users.owner)
    dropin = put(owned_config.parent / "web.toml.d" / "50-a.toml", LOOT, mallory, mallory)
    assert refusal(owned_config) == (
        f"{dropin}: is owned by uid {mallory} ({local_users.mallory}), not by root or the config's owner,"
        f" uid {owner} ({local_users.owner}) (owner uid {mallory} ({local_users.mallory}),"
        f" group {trust.group_name(dropin.stat().st_gid)},"
        " mode 0644): whoever owns it steers what vmrun does as root"
        f" (chown {local_users.owner} {dropin}, or remove it)"
    )
    os.chown(dropin, owner, owner)  # the config's owner may add to their own config
    assert loads_loot(owned_config)


def test_a_link_another_user_owns_is_not_followed(
    base: pathlib.Path, owned_config: pathlib.Path, local_users: LocalUsers
) -> None:
    """In a drop-in directory shared the safe way (sticky, group-writable for operators),
    mallory's own link to a root-owned drop-in of another VM (one that adds its device) is
    not taken, nor is root's link to a file of mallory's."""
    mallory, ops = local_users.uid(local_users.mallory), local_users.gid(local_users.ops)
    shared = owned_config.parent / "web.toml.d"
    os.chown(shared, local_users.uid(local_users.owner), ops)
    shared.chmod(0o3775)
    others = directory(base / "db.toml.d")
    device = put(others / "10-nic.toml", '[[vfio]]\nid = "nic0"\nhost = "0000:02:00.0"\n')
    planted = link(shared / "50-a.toml", str(device), mallory)
    message = refusal(owned_config)
    assert f"{planted} is a symlink owned by uid {mallory} ({local_users.mallory})" in message
    assert f"chown -h {local_users.owner} {planted}" in message
    planted.unlink()
    theirs = put(base / "mallory.toml", LOOT, mallory, mallory)
    link(shared / "50-a.toml", str(theirs))  # root's link now, to mallory's file
    assert f"{shared / '50-a.toml'}: is owned by uid {mallory}" in refusal(owned_config)
    (shared / "50-a.toml").unlink()
    link(shared / "50-a.toml", f"../../{others.name}/10-nic.toml")  # root's link to root's file: followed
    assert [d.id for d in loader.load(owned_config).vfio] == ["nic0"]


def test_a_dropin_directory_a_group_may_write_is_refused(owned_config: pathlib.Path, local_users: LocalUsers) -> None:
    shared = owned_config.parent / "web.toml.d"
    put(shared / "10-mem.toml", '[vm]\nmemory = "96M"\n')
    os.chown(shared, local_users.uid(local_users.owner), local_users.gid(local_users.ops))
    shared.chmod(0o2775)
    message = refusal(owned_config)
    assert f"{shared}: is writable by group {local_users.ops}" in message and f"(chmod g-w {shared})" in message
    os.chown(shared, local_users.uid(local_users.owner), 0)  # root's group: only root is in it
    assert loader.load(owned_config).vm.memory == 96 << 20


def test_swapping_links_in_a_group_writable_directory_never_gets_in(
    base: pathlib.Path, owned_config: pathlib.Path, local_users: LocalUsers
) -> None:
    """The race of the report: in a NAME.toml.d of mode 2775 with a group of operators, a
    member swaps 50-a.toml between a link to a root-owned file and a link to their own,
    as fast as they can, while root reads the config again and again. Then the same in
    the directory made sticky, where a member cannot replace what is not theirs."""
    mallory, ops = local_users.uid(local_users.mallory), local_users.gid(local_users.ops)
    shared = owned_config.parent / "web.toml.d"
    root_file = put(base / "plain.toml", "[vm]\ncpus = 2\n")
    theirs = put(base / "mallory.toml", LOOT, mallory, mallory)
    swapper = """
import os, sys, time
d, a, b = sys.argv[1:4]
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    for target in (a, b):
        try:
            os.symlink(target, d + "/.tmp")
            os.replace(d + "/.tmp", d + "/50-a.toml")
        except OSError:
            pass
"""
    for mode in (0o2775, 0o3775):
        os.chown(shared, local_users.uid(local_users.owner), ops)
        shared.chmod(mode)
        proc = local_users.run_as(
            local_users.mallory, "/usr/bin/python3", "-c", swapper, str(shared), str(root_file), str(theirs), "4"
        )
        try:
            time.sleep(0.3)
            looted = [loads_loot(owned_config) for _ in range(300)]
        finally:
            proc.wait(timeout=30)
        assert not any(looted), f"mode {mode:o}: {looted.count(True)} of {len(looted)} reads took mallory's disk"
        for leftover in shared.iterdir():
            leftover.unlink()
    assert not loads_loot(owned_config)


def test_a_directory_on_the_path_that_another_user_controls_is_refused(
    base: pathlib.Path, local_users: LocalUsers
) -> None:
    mallory = local_users.uid(local_users.mallory)
    theirs = directory(base / "mallory", mallory, mallory)
    cfg = put(theirs / "web.toml", VM)  # root's config, in mallory's directory: they can swap it
    assert f"{theirs}, a directory on its path, is owned by uid {mallory}" in refusal(cfg)
    os.chown(cfg, mallory, mallory)  # mallory's own config, named by root itself: root chose it
    assert loader.load(cfg).owner == mallory
    open_dir = directory(base / "open", mode=0o777)
    cfg = put(open_dir / "web.toml", VM)
    message = refusal(cfg)
    assert f"{open_dir}, a directory on its path, is writable by every user" in message
    assert "sticky bit (chmod +t)" in message
    open_dir.chmod(0o1777)  # as /tmp: nobody may rename or remove root's file there
    assert loader.load(cfg).vm.name == "web"


def test_a_second_name_in_a_shared_directory_is_refused(base: pathlib.Path) -> None:
    sticky = directory(base / "sticky", mode=0o1777)
    original = put(base / "web.toml", VM)
    os.link(original, sticky / "web.toml")  # as if planted there: the file's other name is elsewhere
    assert "has 2 names, in a directory others may write" in refusal(sticky / "web.toml")
    assert loader.load(original).vm.name == "web"  # its own directory is root's alone


def test_nothing_is_read_from_what_is_refused(
    owned_config: pathlib.Path, local_users: LocalUsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    mallory = local_users.uid(local_users.mallory)
    dropin = put(owned_config.parent / "web.toml.d" / "50-a.toml", LOOT, mallory, mallory)
    reopened: list[int] = []
    real = trust.reopen

    def spy(fd: int, st: os.stat_result, flags: int) -> int:
        reopened.append(st.st_ino)
        return real(fd, st, flags)

    monkeypatch.setattr(trust, "reopen", spy)
    refusal(owned_config)
    assert dropin.stat().st_ino not in reopened and owned_config.stat().st_ino in reopened


def test_the_plan_cache_key_reads_under_the_same_rule(owned_config: pathlib.Path, local_users: LocalUsers) -> None:
    mallory = local_users.uid(local_users.mallory)
    dropin = put(owned_config.parent / "web.toml.d" / "50-a.toml", LOOT, mallory, mallory)
    files = {f[0]: f[-1] for f in plan_cache.key(str(owned_config), "/")["files"]}
    assert files[str(owned_config)] == VM
    assert files[str(dropin)].startswith(f"is owned by uid {mallory}")  # the refusal, not the text


def test_root_never_caches_where_the_callers_environment_points(
    base: pathlib.Path, local_users: LocalUsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`su` without `-` or `sudo -E` leaves a user's XDG_CACHE_HOME in root's environment:
    root's cache is its own directory all the same, and a cache directory reached through
    another user's link or directory is neither read nor written."""
    mallory = local_users.uid(local_users.mallory)
    monkeypatch.delenv("VMRUN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "mallory" / ".cache"))
    assert reader.cache_base(0) == "/var/cache/vmrun"
    assert reader.cache_base(1000) == f"{base}/mallory/.cache/vmrun"
    # Through a directory of mallory's, and through mallory's link to a directory of root's.
    target = directory(base / "roots")
    theirs = directory(base / "mallory", mallory, mallory)
    link(directory(theirs / ".cache", mallory, mallory) / "vmrun", str(target), mallory)
    for where in (theirs / ".cache" / "vmrun", theirs / "fresh", base / "mallory" / ".cache" / "vmrun" / "x"):
        monkeypatch.setenv("VMRUN_CACHE_DIR", str(where))
        qemu_caps.write_cache({"planted": {"has_sandbox": False}})
        assert qemu_caps.read_cache() == {}
    assert list(target.iterdir()) == [] and not (theirs / "fresh").exists()


@pytest.mark.parametrize("planted", ["another owner", "mode 0644", "symlink", "second name"])
def test_a_cache_file_root_did_not_write_is_not_trusted(
    base: pathlib.Path, local_users: LocalUsers, fake_qemu: pathlib.Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    cache = directory(base / "cache", mode=0o700)
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(cache))
    real = qemu_caps.probe(str(fake_qemu))
    assert real is not None and real.has_sandbox and qemu_caps.read_cache()  # root's own cache is used
    entry = cache / qemu_caps.CACHE_FILE
    lie = {k: {**v, "has_sandbox": False, "has_iommufd": False} for k, v in qemu_caps.read_cache().items()}
    mallory = local_users.uid(local_users.mallory)
    entry.unlink()
    if planted == "symlink":
        entry.symlink_to(put(base / "lie.json", json.dumps(lie), mode=0o600))
    elif planted == "second name":
        os.link(put(base / "lie.json", json.dumps(lie), mode=0o600), entry)
    else:
        put(entry, json.dumps(lie), *((mallory, mallory, 0o600) if planted == "another owner" else (0, 0, 0o644)))
    assert qemu_caps.read_cache() == {}
    caps = qemu_caps.probe(str(fake_qemu))
    assert caps is not None and caps.has_sandbox and caps.has_iommufd  # probed again, not taken from the lie
