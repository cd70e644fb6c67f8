"""`vmrun smoke -j`: configs that claim one host resource never run at once; others do."""

from __future__ import annotations

import pathlib
import threading
import time

from vmrun.host import facts as host
from vmrun.tools import smoke_schedule


def test_jobs_that_share_a_claim_never_overlap_and_the_others_do() -> None:
    claimed = [frozenset({"pci:0000:01:00.0"}), frozenset({"pci:0000:01:00.0", "file:/a"}), frozenset(), frozenset()]
    spans: dict[int, tuple[float, float]] = {}
    lock = threading.Lock()

    def work(k: int) -> int:
        start = time.monotonic()
        time.sleep(0.2)
        with lock:
            spans[k] = (start, time.monotonic())
        return k * 10

    got = dict(smoke_schedule.run_exclusive(4, claimed, 3, work))
    assert got == {0: 0, 1: 10, 2: 20, 3: 30}
    assert spans[1][0] >= spans[0][1]  # 1 waited for 0, which holds the same device
    assert spans[2][0] < spans[0][1]  # 2 claims nothing: it ran beside 0


def test_what_a_config_claims(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(
        """
[vm]
name = "c"
memory = "1G"
firmware = "uefi"
[[iommufd]]
id = "iommufd0"
fd = 3
[[vfio]]
id = "gpu0"
host = "0000:05:00.0"
iommufd = "iommufd0"
[[vfio]]
id = "nic0"
sysfsdev = "/sys/bus/pci/devices/0000:02:00.0"
[[disk]]
id = "root"
path = "root.qcow2"
[[net]]
id = "net0"
forwards = ["tcp:2222:22"]
[[net]]
id = "net1"
type = "tap"
ifname = "tap0"
"""
    )
    assert smoke_schedule.claims(str(path), host.Host(standard_host)) == {
        "pci:0000:05:00.0",
        "iommu-group:5",
        "sysfs:/sys/bus/pci/devices/0000:02:00.0",
        "pci:0000:02:00.0",
        "iommu-group:2",
        "fd:3",
        f"file:{tmp_path}/root.qcow2",
        "port:tcp:2222",
        "tap:tap0",
        "uefi-vars:c",
    }
    broken = tmp_path / "broken.toml"
    broken.write_text("[vm]\n")
    assert smoke_schedule.claims(str(broken), host.Host(standard_host)) == frozenset()
