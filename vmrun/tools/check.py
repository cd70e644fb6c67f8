"""`vmrun check`: everything the plan checked, plus what only a trial can tell, as one report."""

from __future__ import annotations

from typing import Any

import attrs

from vmrun.base.errors import VmError
from vmrun.base.problems import Problem
from vmrun.kernel.ioctls import trial_cpr, trial_per_process_accounting
from vmrun.plan.placement import shares_ram
from vmrun.plan.planner import Plan
from vmrun.plan.requirements import Finding


@attrs.frozen
class Report:
    config: str
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.status != "fail" for f in self.findings)


def trials(plan: Plan) -> list[Finding]:
    """Open each /dev/iommu vmrun would open, and set the accounting mode it would set."""
    out: list[Finding] = []
    for spec in plan.fds:
        if spec.path != "/dev/iommu" or not spec.per_process_accounting:
            continue
        error = trial_per_process_accounting(plan.host_root, spec.path)
        where = spec.purpose
        if error is None:
            out.append(Finding("ok", Problem(where, "opened /dev/iommu and set per-process accounting on it")))
        else:
            out.append(Finding("fail", Problem(where, error, "run vmrun as root on a kernel with IOMMUFD")))
        break  # one trial answers for every /dev/iommu fd
    return out


def upgradable(plan: Plan) -> list[Finding]:
    """Whether `vmrun upgrade` could hand this VM to a new QEMU: shared RAM and QEMU's CPR
    are in the plan's findings; what the kernel can do for its devices only a trial tells."""
    if not shares_ram(plan.argv):
        return []
    out: list[Finding] = []
    for backend in sorted({"legacy" if d.backend == "legacy" else "iommufd" for d in plan.passthrough}):
        error = trial_cpr(plan.host_root, backend)
        if error is None:
            what = "IOMMU_IOAS_CHANGE_PROCESS" if backend == "iommufd" else "VFIO_UPDATE_VADDR"
            out.append(Finding("ok", Problem("vm.shared_ram", f"the kernel can move {backend} DMA mappings ({what})")))
        else:
            out.append(
                Finding(
                    "warn",
                    Problem("vm.shared_ram", f"{error}: `vmrun upgrade` cannot hand its {backend} devices over"),
                )
            )
    return out


def shared_user(plan: Plan) -> list[Finding]:
    """Other running VMs whose QEMU runs as the same user.

    Processes of one uid can read each other's /proc/PID/environ and take each other's fds
    (pidfd_getfd, ptrace): one VM's QEMU could reach another's disks and devices.
    """
    if plan.run_as is None:
        return []
    from vmrun.control import state  # psutil, only for this check

    try:
        others = [vm for vm in state.all_vms() if vm.running and vm.name != plan.name]
    except VmError:
        return []
    same = [vm for vm in others if vm.run_as == plan.run_as.name]
    if not same:
        return [Finding("ok", Problem("vm.user", f"no other running VM runs as {plan.run_as.name}"))]
    names = ", ".join(f"{vm.name} (pid {vm.pid})" for vm in same)
    return [
        Finding(
            "warn",
            Problem(
                "vm.user",
                f"{names} also run{'s' if len(same) == 1 else ''} as {plan.run_as.name}: processes of one user can "
                "read each other's environment and take each other's fds",
                f"give each VM a user of its own (useradd --system --no-create-home vm-{plan.name})",
            ),
        )
    ]


def check(plan: Plan) -> Report:
    findings = (*plan.findings, *shared_user(plan), *trials(plan), *upgradable(plan))
    return Report(plan.config, tuple(located(plan, f) for f in findings))


def located(plan: Plan, finding: Finding) -> Finding:
    """The finding with the drop-in that set its key, when a drop-in did."""
    file = plan.file_of(finding.problem.path)
    if file == plan.config:
        return finding
    return attrs.evolve(finding, problem=attrs.evolve(finding.problem, file=file))


def where(problem: Problem) -> str:
    return f"{problem.file}: {problem.path}" if problem.file else problem.path


def text(report: Report) -> str:
    width = max([len(where(f.problem)) for f in report.findings] + [4])
    lines = [f"# vmrun check for {report.config}"]
    for f in report.findings:
        lines.append(f"{f.status:<4}  {where(f.problem):<{width}}  {f.problem.message}")
        if f.problem.hint:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {f.problem.hint}")
    fails = sum(f.status == "fail" for f in report.findings)
    warns = sum(f.status == "warn" for f in report.findings)
    lines.append(f"# {'ready to launch' if report.ok else 'cannot launch'}: {fails} failed, {warns} warnings")
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    return {
        "config": report.config,
        "ok": report.ok,
        "checks": [
            {
                "status": f.status,
                "file": f.problem.file or report.config,
                "path": f.problem.path,
                "message": f.problem.message,
                "fix": f.problem.hint,
            }
            for f in report.findings
        ],
    }
