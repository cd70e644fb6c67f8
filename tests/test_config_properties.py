"""Properties that no input may break, checked with hypothesis.

1. Any text or bytes given as a config gives a Config or a ConfigError, never another
   exception (a traceback is a bug: vmrun runs as root and must fail cleanly), and every
   message line is printable ASCII, so nothing of a config acts on the terminal.
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
from vmrun.base.errors import ConfigError
from vmrun.base.sizes import parse_size
from vmrun.config import keytable, loader, parsers, rules
from vmrun.config.model import Config
from vmrun.qemu import cmdline as qemu_cmdline

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOML values of every kind, nested, with the characters and numbers that broke validation before.
scalars = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.sampled_from(
        ["t\n", "\x00", "q35\n", "0.5K", "9" * 400 + "G", "999999999999999999999T", "../x", "..", "1\u212a", "\x1b[2J"]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-(10**1000), max_value=10**1000),
    st.booleans(),
    st.floats(allow_nan=False),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = [
    k.name
    for k in (*keytable.VM_KEYS, *keytable.IOMMUFD_KEYS, *keytable.VFIO_KEYS, *keytable.DISK_KEYS, *keytable.NET_KEYS)
]
keys = st.one_of(st.sampled_from([*KEYS, "bogus"]), st.text(max_size=8))
tables = st.dictionaries(keys, values, max_size=8)
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
VALID = '[vm]\nname = "t"\nmemory = "64M"\n'


def parse_or_error(text: str) -> None:
    try:
        assert isinstance(loader.parse(text, pathlib.Path("fuzz.toml")), Config)
    except ConfigError as e:
        assert e.problems
        for line in e.lines():
            assert line.startswith("fuzz.toml: ")
            assert line.isascii() and line.isprintable(), line


@FUZZ
@given(st.text())
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    parse_or_error(text)


@FUZZ
@given(documents)
def test_any_toml_document_gives_a_config_or_a_config_error(document: dict[str, Any]) -> None:
    parse_or_error(tomli_w.dumps(document))


@st.composite
def nested(draw: st.DrawFn) -> str:
    """Arrays and inline tables nested up to far deeper than tomllib's recursion can go."""
    depth = draw(st.one_of(st.integers(0, 100), st.sampled_from([998, 999, 1000, 1001, 5000, 12_000])))
    opener = draw(st.sampled_from(["[", "{a=", "[{a="]))
    closer = {"[": "]", "{a=": "}", "[{a=": "}]"}[opener]
    return opener * depth + draw(st.sampled_from(["1", '"x"', "[]"])) + closer * depth


# Python converts at most 4300 decimal digits to an int; hex has no such limit.
lengths = st.one_of(st.integers(1, 30), st.sampled_from([4300, 4301, 6000]))
numbers = st.one_of(
    lengths.map(lambda n: "9" * n),
    lengths.map(lambda n: "-" + "1" * n),
    lengths.map(lambda n: "0x" + "f" * n),
    lengths.map(lambda n: "1." + "5" * n + "e999"),
)


@FUZZ
@given(
    st.sampled_from(["x", "vm.name", "vm.cpus", "vm.memory", "vm.args", "vm.env", "vfio.props", "net.forwards"]),
    st.one_of(nested(), numbers),
)
def test_deep_and_huge_values_give_a_config_error(where: str, value: str) -> None:
    section, _, key = where.rpartition(".")
    if section == "vfio":
        text = VALID + f'[[vfio]]\nid = "v"\nhost = "01:00.0"\n{key} = {value}\n'
    elif section == "net":
        text = VALID + f'[[net]]\nid = "n"\n{key} = {value}\n'
    elif section == "vm":
        text = "[vm]\n" + f"{key} = {value}\n"
    else:
        text = f"{key} = {value}\n" + VALID
    parse_or_error(text)


def load_or_error(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".toml") as f:
        f.write(data)
        f.flush()
        try:
            loader.load(f.name)
        except ConfigError as e:
            assert e.problems
            assert all(line.isascii() and line.isprintable() for line in e.lines())


@FUZZ
@given(st.binary(max_size=200))
def test_any_file_gives_a_config_or_a_config_error(data: bytes) -> None:
    load_or_error(data)


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(min_size=1, max_size=6))
def test_a_valid_file_with_bytes_spliced_in_gives_a_config_or_a_config_error(at: int, junk: bytes) -> None:
    data = VALID.encode()
    load_or_error(data[:at] + junk + data[at:])


def qemu_split(value: str) -> list[tuple[str, str | None]]:
    """A -device/-object/... value split as QEMU's option parser does (`vmrun import` reads
    command lines with the same function): (key, value) pairs, (text, None) for an element
    without '=' (the driver)."""
    return qemu_cmdline.keyvals(value)


def test_qemu_split() -> None:
    assert qemu_split("vfio-pci,id=a,romfile=x,,y=z,,,x-vga=on") == [
        ("vfio-pci", None),
        ("id", "a"),
        ("romfile", "x,y=z,"),
        ("x-vga", "on"),
    ]


KEYVAL_OPTIONS = ("-device", "-object", "-netdev", "-blockdev", "-chardev", "-add-fd")


def options(plan_options: tuple[tuple[str, ...], ...], argv: list[str]) -> list[tuple[str, str | None]]:
    """The command line as QEMU reads it: each option with its value. QEMU knows from its own
    table which options take a value; the plan's grouping of argv stands in for that table,
    checked against argv itself."""
    assert [arg for opt in plan_options for arg in opt] == argv
    out: list[tuple[str, str | None]] = []
    for opt in plan_options[1:]:
        assert opt[0].startswith("-") and len(opt) <= 2, f"{opt!r}: a value escaped into its own argument"
        out.append((opt[0], opt[1] if len(opt) == 2 else None))
    return out


def prop_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def keys_once(split: list[tuple[str, str | None]]) -> bool:
    # A leading element without '=' is the driver (QEMU's implied key); hostfwd is the one
    # property QEMU takes more than once (one per forward). Of any other, QEMU uses the last.
    names = ["driver" if i == 0 and v is None else k for i, (k, v) in enumerate(split) if k != "hostfwd"]
    return len(names) == len(set(names))


# Values that QEMU's option syntax is made of: a comma ends a property, '=' starts a value.
hostile = st.text(alphabet=st.sampled_from(list("ab,=: ;'\"\\-x.")), min_size=1, max_size=10)
not_dots = hostile.filter(lambda t: t.strip(".") != "")
prop_values = st.one_of(hostile, st.just(""), st.integers(-(2**63), 2**64 - 1), st.booleans())
# Names QEMU gives a meaning, then any: those vmrun sets itself are the config's to refuse.
prop_names = st.one_of(
    st.sampled_from(["x-vga", "rombar", "romfile", "bus", "addr", "multifunction", "driver", "id", "fd"]),
    st.from_regex(rules.ID_RE, fullmatch=True).filter(lambda n: len(n) <= 20),
).filter(lambda n: n not in rules.PLANNED_PROPS)
ids = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,21}", fullmatch=True).filter(
    lambda i: i not in rules.RESERVED_IDS and not rules.BACKING_NODE_RE.fullmatch(i)
)
names = st.from_regex(rules.NAME_RE, fullmatch=True)
BOUND = ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:05:00.0"]


@st.composite
def mac_addresses(draw: st.DrawFn) -> str:
    octets = [draw(st.integers(0, 127)) * 2, *draw(st.lists(st.integers(0, 255), min_size=5, max_size=5))]
    return ":".join(f"{o:02X}" for o in octets)


@st.composite
def forwards(draw: st.DrawFn) -> str:
    proto = draw(st.sampled_from(["", "tcp:", "udp:"]))
    address = draw(st.one_of(st.just(""), st.ip_addresses(v=4).map(lambda a: f"{a}:")))
    return f"{proto}{address}{draw(st.integers(1, 65535))}:{draw(st.integers(1, 65535))}"


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    counts = [draw(st.integers(0, n)) for n in (2, 4, 2, 2)]
    unique = iter(draw(st.lists(ids, min_size=sum(counts), max_size=sum(counts), unique=True)))
    objects: list[dict[str, Any]] = [{"id": next(unique)} for _ in range(counts[0])]
    hosts = iter(draw(st.permutations(BOUND)))
    fds = iter(draw(st.permutations(range(10, 20))))
    vfio = []
    for _ in range(counts[1]):
        dev: dict[str, Any] = {"id": next(unique)}
        source = draw(st.sampled_from(["host", "sysfsdev", "fd"] if objects else ["host", "sysfsdev"]))
        if source == "host":
            dev["host"] = next(hosts)
        elif source == "sysfsdev":
            dev["sysfsdev"] = "/sys/devices/" + draw(not_dots)
            dev["driver"] = draw(st.sampled_from(["vfio-pci", "vfio-platform"]))
        else:
            dev["fd"] = next(fds)
        if objects and (source == "fd" or draw(st.booleans())):
            dev["iommufd"] = draw(st.sampled_from(objects))["id"]
        props = draw(st.dictionaries(prop_names, prop_values, max_size=3))
        if props:
            dev["props"] = props
        vfio.append(dev)
    disks = []
    for _ in range(counts[2]):
        disk: dict[str, Any] = {"id": next(unique), "path": draw(not_dots) + ".raw"}
        disk["interface"] = draw(st.sampled_from(["virtio-blk", "nvme", "scsi"]))
        disk["trusted"] = draw(st.booleans())
        if draw(st.booleans()):
            disk["serial"] = draw(st.from_regex(rules.SERIAL_RE, fullmatch=True))
        disks.append(disk)
    nets = []
    for _ in range(counts[3]):
        net: dict[str, Any] = {"id": next(unique), "forwards": draw(st.lists(forwards(), max_size=3))}
        if draw(st.booleans()):
            net["mac"] = draw(mac_addresses())
        nets.append(net)
    vm: dict[str, Any] = {
        "name": draw(names),
        "memory": draw(st.sampled_from(["{}M", "{}K"])),
        "accel": draw(st.sampled_from(["tcg", "kvm"])),
        "machine": draw(st.sampled_from(["q35", "pc", "pc-q35-8.2"])),
        "sandbox": draw(st.booleans()),
        "env": draw(st.dictionaries(st.from_regex(parsers.ENV_NAME_RE, fullmatch=True), hostile, max_size=2)),
    }
    vm["env"] = {k: v for k, v in vm["env"].items() if k not in parsers.ENV_RESERVED}
    mib = draw(st.integers(1, 16 * 1024 * 1024))
    vm["memory"] = vm["memory"].format(mib if vm["memory"].endswith("M") else mib * 1024)
    if draw(st.booleans()):
        vm["kernel"] = "/boot/" + draw(not_dots)
        vm["append"] = draw(hostile)
    return {"vm": vm, "iommufd": objects, "vfio": vfio, "disk": disks, "net": nets}


@pytest.fixture(scope="module")
def host_and_dir() -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    # Built once for the module: hypothesis runs every example in one call of the test.
    with tempfile.TemporaryDirectory() as d:
        root = fakehost.build(pathlib.Path(d) / "host", fakehost.STANDARD)
        yield root, pathlib.Path(d)


def the_one(split_options: list[list[tuple[str, str | None]]], ident: str) -> list[tuple[str, str | None]]:
    found = [s for s in split_options if ("id", ident) in s]
    assert len(found) == 1, (ident, found)
    return found[0]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid_configs())
def test_argv_split_back_gives_exactly_the_configs_options(
    host_and_dir: tuple[pathlib.Path, pathlib.Path], data: dict[str, Any]
) -> None:
    root, directory = host_and_dir
    path = directory / "vm.toml"
    path.write_text(tomli_w.dumps(data))
    for disk in data["disk"]:
        (directory / disk["path"]).write_bytes(b"")
    cfg = loader.load(path)
    plan = plan_for(path, root)
    opts = options(plan.options, plan.argv)
    split = {opt: [qemu_split(v) for o, v in opts if o == opt and v is not None] for opt in KEYVAL_OPTIONS}
    for parts in (p for splits in split.values() for p in splits):
        assert keys_once(parts), parts
    devices = split["-device"]

    for dev in cfg.vfio:
        expected: list[tuple[str, str | None]] = [(dev.driver, None), ("id", dev.id)]
        got = the_one(devices, dev.id)
        if dev.fd is not None:
            expected += [("fd", str(dev.fd)), ("iommufd", dev.iommufd)]
        elif dev.iommufd is not None:
            fd = dict(got)["fd"]
            assert fd is not None and fd.isdigit()
            expected += [("fd", fd), ("iommufd", dev.iommufd)]
        elif dev.host is not None:
            expected.append(("host", dev.host))
        else:
            expected.append(("sysfsdev", dev.sysfsdev))
        expected += [(k, prop_text(v)) for k, v in dev.props]
        assert sorted(got, key=str) == sorted(expected, key=str), plan.argv

    assert [dict(o)["id"] for o in split["-object"]] == [o.id for o in cfg.iommufd]

    for disk in cfg.disk:
        disk_device = dict(the_one(devices, disk.id))
        if disk.serial is not None:
            assert disk_device["serial"] == disk.serial
        assert not any(str(disk.path) in arg for arg in plan.argv)  # images go to QEMU as fds

    netdevs = split["-netdev"]
    for net in cfg.net:
        netdev = the_one(netdevs, net.id)
        assert netdev == [("user", None), ("id", net.id), *[("hostfwd", f.hostfwd()) for f in net.forwards]]
        nic = dict(the_one(devices, net.id))
        assert nic["netdev"] == net.id
        if net.mac is not None:
            assert nic["mac"] == net.mac.lower()

    assert sum(o == "-name" for o, _ in opts) == 1
    [name] = [qemu_split(v) for o, v in opts if o == "-name" and v is not None]
    assert [v for k, v in name if k == "guest"] == [cfg.vm.name]
    [machine] = [qemu_split(v) for o, v in opts if o == "-machine" and v is not None]
    assert machine[0] == (cfg.vm.machine, None)
    [memory] = [qemu_split(v) for o, v in opts if o == "-m" and v is not None]
    assert [parse_size(v if v is not None else k) for k, v in memory if v is None or k == "size"] == [cfg.vm.memory]
    if cfg.vm.append is not None:
        assert [v for o, v in opts if o == "-append"] == [cfg.vm.append]
        assert [v for o, v in opts if o == "-kernel"] == [str(cfg.vm.kernel)]
    else:
        assert not any(o in ("-append", "-kernel") for o, _ in opts)


def test_valid_configs_are_valid() -> None:
    """The generator above only makes configs the parser accepts, or the property proves nothing."""

    @settings(max_examples=50, deadline=None)
    @given(valid_configs())
    def check(data: dict[str, Any]) -> None:
        assert isinstance(loader.parse(tomli_w.dumps(data), pathlib.Path("/tmp/vm.toml")), Config)

    check()
