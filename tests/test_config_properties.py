"""Properties that no input may break, checked with hypothesis.

1. Any text or bytes given as a config gives a Config or a ConfigError, never another
   exception (a traceback is a bug: vmrun runs as root and must fail cleanly).
2. Any valid config's command line, split back by QEMU's own option rules (a ',' ends a
   property, ',,' is a literal comma), gives exactly the options and properties the config
   states: no value can smuggle in a property or an option.
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fakehost
from tests.conftest import plan_for
from vmrun import config
from vmrun.errors import ConfigError
from vmrun.model import Config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOML values of every kind, nested, with the characters that broke validation before.
scalars = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.sampled_from(["t\n", "\x00", "q35\n", "0.5K", "9" * 400 + "G", "999999999999999999999T", "../x", ".."]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = [k.name for k in (*config.VM_KEYS, *config.VFIO_KEYS, *config.DISK_KEYS, *config.NET_KEYS)]
tables = st.dictionaries(st.sampled_from([*KEYS, "bogus"]), values, max_size=8)
documents = st.fixed_dictionaries(
    {},
    optional={
        "vm": tables,
        "iommufd": st.lists(tables, max_size=2),
        "vfio": st.lists(tables, max_size=2),
        "disk": st.lists(tables, max_size=2),
        "net": st.lists(tables, max_size=2),
        "extra": values,
    },
)


def parse_or_error(text: str) -> None:
    try:
        assert isinstance(config.parse(text, pathlib.Path("fuzz.toml")), Config)
    except ConfigError as e:
        assert e.problems and all(line.startswith("fuzz.toml: ") for line in e.lines())


@FUZZ
@given(st.text())
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    parse_or_error(text)


@FUZZ
@given(documents)
def test_any_toml_document_gives_a_config_or_a_config_error(document: dict[str, Any]) -> None:
    parse_or_error(tomli_w.dumps(document))


@FUZZ
@given(st.binary(max_size=200))
def test_any_file_gives_a_config_or_a_config_error(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".toml") as f:
        f.write(data)
        f.flush()
        try:
            config.load(f.name)
        except ConfigError as e:
            assert e.problems


def qemu_split(value: str) -> list[tuple[str, str | None]]:
    """A -device/-object/... value split as QEMU's option parser does: (key, value) pairs,
    (text, None) for an element without '=' (the driver)."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    out: list[tuple[str, str | None]] = []
    for part in parts:
        key, eq, val = part.partition("=")
        out.append((key, val if eq else None))
    return out


# Options of vmrun's command lines that take a value; the rest are flags.
WITH_VALUE = {
    "-name", "-machine", "-accel", "-cpu", "-m", "-smp", "-display", "-serial", "-kernel", "-initrd", "-append",
    "-device", "-object", "-netdev", "-chardev", "-blockdev", "-add-fd", "-mon", "-vnc", "-sandbox",
}  # fmt: skip


def options(argv: list[str]) -> list[tuple[str, str | None]]:
    """argv (after the binary) as QEMU reads it: each option with its value."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        assert opt.startswith("-"), f"{opt!r} is not an option: a value escaped into its own argument"
        if opt in WITH_VALUE:
            out.append((opt, argv[i + 1]))
            i += 2
        else:
            out.append((opt, None))
            i += 1
    return out


def prop_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


hostile = st.text(alphabet=st.sampled_from(list("ab,=: ;'\"\\-x")), min_size=1, max_size=10)
prop_values = st.one_of(hostile, st.integers(-5, 5), st.booleans())
prop_names = st.sampled_from(["x-vga", "rombar", "romfile", "x-opt", "multifunction"])
BOUND = ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:05:00.0"]


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    objects: list[dict[str, Any]] = [{"id": f"iommufd{i}"} for i in range(draw(st.integers(0, 2)))]
    hosts = draw(st.lists(st.sampled_from(BOUND), unique=True, max_size=4))
    vfio = []
    for i, host in enumerate(hosts):
        dev: dict[str, Any] = {"id": f"dev{i}", "host": host}
        use_object: bool = draw(st.booleans())
        if objects and use_object:
            dev["iommufd"] = draw(st.sampled_from(objects))["id"]
        props = draw(st.dictionaries(prop_names, prop_values, max_size=3))
        if props:
            dev["props"] = props
        vfio.append(dev)
    nets = []
    for i in range(draw(st.integers(0, 2))):
        ports = draw(st.lists(st.tuples(st.integers(1, 65535), st.integers(1, 65535)), max_size=3))
        nets.append({"id": f"net{i}", "forwards": [f"tcp:{h}:{g}" for h, g in ports]})
    vm: dict[str, Any] = {"name": "prop", "memory": f"{draw(st.integers(1, 4096))}M", "accel": "tcg"}
    if draw(st.booleans()):
        vm["kernel"] = "/boot/" + draw(hostile)
        vm["append"] = draw(hostile)
    return {"vm": vm, "iommufd": objects, "vfio": vfio, "net": nets}


@pytest.fixture(scope="module")
def host_and_dir() -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    with tempfile.TemporaryDirectory() as d:
        root = fakehost.build(pathlib.Path(d) / "host", fakehost.STANDARD)
        yield root, pathlib.Path(d)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_configs())
def test_argv_split_back_gives_exactly_the_configs_options(
    host_and_dir: tuple[pathlib.Path, pathlib.Path], data: dict[str, Any]
) -> None:
    root, directory = host_and_dir
    path = directory / "vm.toml"
    path.write_text(tomli_w.dumps(data))
    cfg = config.load(path)
    argv = plan_for(path, root).argv
    opts = options(argv)
    devices = {dict(qemu_split(v))["id"]: qemu_split(v) for o, v in opts if o == "-device" and v}
    for dev in cfg.vfio:
        expected: list[tuple[str, str | None]] = [(dev.driver, None), ("id", dev.id)]
        if dev.iommufd is not None:
            fd = dict(devices[dev.id])["fd"]
            assert fd is not None and fd.isdigit()
            expected += [("fd", fd), ("iommufd", dev.iommufd)]
        else:
            expected.append(("host", dev.host))
        expected += [(k, prop_text(v)) for k, v in dev.props]
        assert sorted(devices[dev.id], key=str) == sorted(expected, key=str), argv
    objects = [qemu_split(v) for o, v in opts if o == "-object" and v]
    assert [dict(o)["id"] for o in objects] == [o.id for o in cfg.iommufd]
    netdevs = [qemu_split(v) for o, v in opts if o == "-netdev" and v]
    for net, netdev in zip(cfg.net, netdevs, strict=True):
        assert netdev == [("user", None), ("id", net.id), *[("hostfwd", f.hostfwd()) for f in net.forwards]]
    if cfg.vm.append is not None:
        assert ("-append", cfg.vm.append) in opts
        assert ("-kernel", str(cfg.vm.kernel)) in opts
