"""Guest memory placement: huge pages, prealloc and NUMA binding on a fake two-node host."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
import tomli_w

from tests import fakehost
from tests.conftest import plan_for
from vmrun.base import cpulist
from vmrun.base.errors import ConfigError, LaunchError
from vmrun.config import loader
from vmrun.host import numa, reader
from vmrun.launch import launcher as launch
from vmrun.plan import render
from vmrun.plan.memlock import MemlockPlan
from vmrun.plan.planner import Plan


def vm_config(tmp_path: pathlib.Path, devices: tuple[str, ...] = ("0000:01:00.0",), **vm: Any) -> pathlib.Path:
    data: dict[str, Any] = {
        "vm": {"name": "t", "memory": "1G", "cpus": 4, "user": "nobody", **vm},
        "iommufd": [{"id": "iommufd0"}],
        "vfio": [{"id": f"dev{i}", "host": bdf, "iommufd": "iommufd0"} for i, bdf in enumerate(devices)],
    }
    path = tmp_path / "vm.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def backend(p: Plan) -> str | None:
    """The -object of the guest RAM, if the plan has one."""
    found = [opt[1] for opt in p.options if opt[0] == "-object" and "id=guest-ram" in opt[1]]
    assert len(found) <= 1
    return found[0] if found else None


def rendered(p: Plan, status: str) -> list[str]:
    return [x.render() for x in p.with_status(status)]  # type: ignore[arg-type]


def test_auto_binds_ram_and_cpus_to_the_devices_node_on_huge_pages(
    tmp_path: pathlib.Path, numa_host: pathlib.Path
) -> None:
    p = plan_for(vm_config(tmp_path, ("0000:01:00.0", "0000:02:00.0"), memory="8G", hugepages="2M"), numa_host)
    assert p.problems == ()
    assert backend(p) == (
        "memory-backend-memfd,id=guest-ram,size=8G,hugetlb=on,hugetlbsize=2M,"
        "prealloc=on,prealloc-threads=4,host-nodes=1,policy=bind"
    )
    assert ("-machine", "q35,memory-backend=guest-ram") in p.options
    assert p.cpu_affinity == (4, 5, 6, 7)
    assert p.numa_node == 1
    js = render.to_json(p)
    assert js["cpu_affinity"] == [4, 5, 6, 7] and js["numa_node"] == 1
    assert "vm.numa: guest RAM and QEMU's CPUs on NUMA node 1, next to dev0, dev1" in rendered(p, "ok")
    assert "vm.hugepages: 4096 2M pages for guest RAM; NUMA node 1 has 4096 free" in rendered(p, "ok")


def test_too_few_free_pages_on_the_node_is_a_problem_with_the_figures(
    tmp_path: pathlib.Path, numa_host: pathlib.Path
) -> None:
    # 03:00.0 sits on node 0, which has 100 free 2M pages; the host as a whole has 4196.
    p = plan_for(vm_config(tmp_path, ("0000:03:00.0",), memory="1G", hugepages="2M"), numa_host)
    assert rendered(p, "fail") == [
        "vm.hugepages: the VM needs 512 free 2M pages (1G) on NUMA node 0; 100 of 100 are free "
        "(reserve 412 more: echo 512 > /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages,"
        " or on the kernel command line: hugepagesz=2M hugepages=N)"
    ]
    assert p.cpu_affinity == (0, 1, 2, 3)


def test_without_binding_pages_come_from_the_whole_host(tmp_path: pathlib.Path, numa_host: pathlib.Path) -> None:
    p = plan_for(vm_config(tmp_path, ("0000:03:00.0",), memory="1G", hugepages="2M", numa="off"), numa_host)
    assert p.problems == () and p.cpu_affinity is None
    assert (
        backend(p)
        == "memory-backend-memfd,id=guest-ram,size=1G,hugetlb=on,hugetlbsize=2M,prealloc=on,prealloc-threads=4"
    )
    p = plan_for(vm_config(tmp_path, ("0000:03:00.0",), memory="16G", hugepages="2M", numa="off"), numa_host)
    assert rendered(p, "fail") == [
        "vm.hugepages: the VM needs 8192 free 2M pages (16G) on the host; 4196 of 4196 are free "
        "(reserve 3996 more: echo 8192 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages,"
        " or on the kernel command line: hugepagesz=2M hugepages=N)"
    ]


def test_a_missing_page_size_is_a_problem(tmp_path: pathlib.Path, numa_host: pathlib.Path) -> None:
    p = plan_for(vm_config(tmp_path, ("0000:03:00.0",), memory="2G", hugepages="1G"), numa_host)
    assert rendered(p, "fail") == [
        "vm.hugepages: NUMA node 0 has no 1G huge pages "
        "(/sys/devices/system/node/node0/hugepages/hugepages-1048576kB is missing)"
        " (reserve them on the kernel command line: hugepagesz=1G hugepages=N"
        " (the kernel needs CONFIG_HUGETLBFS), or use smaller pages)"
    ]


def test_devices_on_several_nodes_or_unknown_are_not_bound(tmp_path: pathlib.Path, numa_host: pathlib.Path) -> None:
    p = plan_for(vm_config(tmp_path, ("0000:01:00.0", "0000:03:00.0")), numa_host)
    assert backend(p) is None and p.cpu_affinity is None and p.problems == ()
    assert rendered(p, "warn") == [
        "vm.numa: the devices sit on several NUMA nodes (dev0 on node 1, dev1 on node 0): guest RAM and CPUs"
        ' are not bound (set numa = N to choose one, or numa = "off")'
    ]
    p = plan_for(vm_config(tmp_path, ("0000:01:00.0", "0000:05:00.0")), numa_host)
    assert backend(p) is None and p.cpu_affinity is None
    assert rendered(p, "warn") == [
        "vm.numa: the host's NUMA node of dev1 is unknown (numa_node is -1, or passed as an fd):"
        " guest RAM and CPUs are not bound (set numa = N to bind them to node N)"
    ]


def test_explicit_node(tmp_path: pathlib.Path, numa_host: pathlib.Path) -> None:
    p = plan_for(vm_config(tmp_path, numa=1), numa_host)
    assert backend(p) == "memory-backend-ram,id=guest-ram,size=1G,host-nodes=1,policy=bind"
    assert p.cpu_affinity == (4, 5, 6, 7) and rendered(p, "warn") == []
    p = plan_for(vm_config(tmp_path, numa=0), numa_host)
    assert p.cpu_affinity == (0, 1, 2, 3)
    assert rendered(p, "warn") == [
        "vm.numa: guest RAM is bound to node 0, but dev0 (node 1) sits elsewhere: DMA crosses nodes"
        ' (numa = "auto" binds to the devices\' node when they share one)'
    ]
    p = plan_for(vm_config(tmp_path, numa=2), numa_host)
    assert rendered(p, "fail") == ['vm.numa: the host has no NUMA node 2 (its nodes: 0, 1; or use numa = "auto")']


def test_one_node_host_keeps_qemus_own_ram(tmp_path: pathlib.Path, host_tree: pathlib.Path) -> None:
    # The plan of every existing config stays as it was: no backend, no affinity, no note.
    p = plan_for(vm_config(tmp_path), host_tree)
    assert backend(p) is None and p.cpu_affinity is None and p.notes == ()
    assert all(opt[0] != "-machine" or opt[1] == "q35" for opt in p.options)
    assert render.to_json(p)["cpu_affinity"] is None
    p = plan_for(vm_config(tmp_path, numa=0), host_tree)
    assert rendered(p, "fail") == [
        "vm.numa: the host has no NUMA node 0 (its nodes: none (/sys/devices/system/node is missing);"
        ' or use numa = "auto")'
    ]


def test_prealloc_threads_are_capped_by_the_cpus_qemu_may_use(tmp_path: pathlib.Path, numa_host: pathlib.Path) -> None:
    cfg = vm_config(tmp_path, memory="1G", cpus=16, hugepages="2M")
    # Node 1 has CPUs 4-7; vmrun may use only 5 and 6 of them.
    p = plan_for(cfg, numa_host, allowed_cpus=frozenset({0, 5, 6}))
    assert "prealloc-threads=2," in (backend(p) or "")
    # None of node 1's CPUs allowed: the launch keeps the inherited affinity, the node's count stands.
    p = plan_for(cfg, numa_host, allowed_cpus=frozenset({0}))
    assert "prealloc-threads=4," in (backend(p) or "")
    p = plan_for(vm_config(tmp_path, memory="1G", cpus=16, prealloc=True, numa="off"), numa_host)
    assert backend(p) == "memory-backend-ram,id=guest-ram,size=1G,prealloc=on,prealloc-threads=8"


def test_cli_check_shows_the_shortage(
    tmp_path: pathlib.Path, numa_host: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmrun import cli

    cfg = vm_config(tmp_path, ("0000:03:00.0",), hugepages="2M")
    assert cli.main(["check", str(cfg), "--host-root", str(numa_host)]) != 0
    out = capsys.readouterr().out
    assert "vm.hugepages" in out and "512 free 2M pages" in out and "100 of 100 are free" in out


@pytest.mark.parametrize(
    ("vm", "expected"),
    [
        ({"hugepages": "4K"}, 'vm.hugepages: "4K" is not one of off, 2M, 1G'),
        ({"hugepages": True}, "vm.hugepages: expected a string, got boolean true"),
        ({"prealloc": "yes"}, 'vm.prealloc: expected true or false, got string "yes"'),
        ({"numa": "on"}, 'vm.numa: "on" is not a NUMA setting'),
        ({"numa": True}, "vm.numa: true is not a NUMA setting"),
        ({"numa": -1}, "vm.numa: -1 is out of range 0..1023"),
        ({"numa": 1024}, "vm.numa: 1024 is out of range 0..1023"),
        ({"memory": "1536M", "hugepages": "1G"}, "vm.memory: 1536M is not a whole number of 1G huge pages"),
        ({"memory": "1025M", "hugepages": "2M"}, "vm.memory: 1025M is not a whole number of 2M huge pages"),
    ],
)
def test_key_validation(tmp_path: pathlib.Path, vm: Mapping[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        loader.load(vm_config(tmp_path, **vm))
    assert any(line.split(": ", 1)[1].startswith(expected) for line in e.value.lines()), e.value.lines()


def test_key_values(tmp_path: pathlib.Path) -> None:
    vm = loader.load(vm_config(tmp_path, hugepages="1G", memory="2G", prealloc=True, numa=3)).vm
    assert (vm.hugepages, vm.prealloc, vm.numa) == ("1G", True, 3)
    vm = loader.load(vm_config(tmp_path)).vm
    assert (vm.hugepages, vm.prealloc, vm.numa) == ("off", False, "auto")


def test_cpulist_round_trip() -> None:
    assert cpulist.parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert cpulist.format_cpulist((0, 1, 2, 3, 8, 10, 11)) == "0-3,8,10-11"
    assert cpulist.parse_cpulist("") == ()
    assert reader.device_node("-1") is None and reader.device_node(None) is None
    assert reader.device_node("1") == 1 and reader.device_node("x") is None


def plan_with_affinity(cpus: tuple[int, ...] | None) -> Plan:
    empty = Plan(
        name="t", config="t.toml", host_root="/", options=(), state_dir="/x", fds=(),
        memlock=MemlockPlan(None, ""), run_as=None,
    )  # fmt: skip
    return attrs.evolve(empty, cpu_affinity=cpus, numa_node=1)


@pytest.mark.parametrize(
    ("allowed", "wanted", "set_to", "said"),
    [
        ({0, 1, 2, 3, 4, 5, 6, 7}, (4, 5, 6, 7), {4, 5, 6, 7}, None),
        ({0, 5, 6}, (4, 5, 6, 7), {5, 6}, "vmrun: QEMU runs on CPUs 5-6, the part of NUMA node 1's CPUs (4-7)"),
        ({0, 1}, (4, 5, 6, 7), None, "vmrun: none of NUMA node 1's CPUs (4-7) is allowed to vmrun (it may use 0-1)"),
        ({0, 1}, None, None, None),
    ],
)
def test_launch_intersects_the_affinity_with_the_allowed_cpus(
    monkeypatch: pytest.MonkeyPatch,
    allowed: set[int],
    wanted: tuple[int, ...] | None,
    set_to: set[int] | None,
    said: str | None,
) -> None:
    calls: list[set[int]] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: calls.append(set(cpus)))
    messages: list[str] = []
    launch.set_cpu_affinity(plan_with_affinity(wanted), messages.append)
    assert calls == ([set_to] if set_to is not None else [])
    if said is None:
        assert messages == []
    else:
        assert len(messages) == 1 and messages[0].startswith(said), messages


def test_launch_reports_a_refused_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4})

    def refuse(pid: int, cpus: set[int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with pytest.raises(LaunchError, match="cannot set QEMU's CPU affinity to 4: Operation not permitted"):
        launch.set_cpu_affinity(plan_with_affinity((4,)), lambda _: None)


def test_fake_two_node_host_reads_as_built(numa_host: pathlib.Path) -> None:
    facts = numa.memory_facts(numa_host, frozenset({0}))
    assert sorted(facts.nodes) == [0, 1]
    assert facts.nodes[1].cpus == (4, 5, 6, 7)
    assert facts.nodes[1].hugepages[2048] == numa.HugePagePool(2048, 4096, 4096)
    assert facts.hugepages[1048576].free == 8
    assert fakehost.TWO_NODES.devices[0].numa_node == 1
