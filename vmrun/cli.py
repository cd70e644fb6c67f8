"""The `vmrun` command: validate, plan and run VM configs.

Exit status: 0 success; 1 the host cannot do what the config asks, or the launch failed;
2 bad input (config errors, wrong command line). Errors never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import attrs

from vmrun import __version__, config, host, render
from vmrun.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, LaunchError
from vmrun.plan import Plan, plan


class UsageError(Exception):
    pass


def add_host_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host-root",
        metavar="DIR",
        default="/",
        help="read sysfs and /dev under DIR instead of / (for tests and inspection)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="vmrun",
        description="Declarative QEMU launcher for VFIO passthrough with iommufd and fd passing.",
        epilog="exit status: 0 ok, 1 host or launch failure, 2 bad config or usage",
    )
    top.add_argument("--version", action="version", version=f"vmrun {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check config files; print every problem",
        description="Check config files without looking at the host.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")

    p = sub.add_parser(
        "plan",
        help="print what `run` would do",
        description="Print the command line, fds, memlock and identity of a launch.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_host_root(p)

    p = sub.add_parser(
        "check",
        help="preflight: is this host ready for the config?",
        description="Check the host for a config: QEMU, /dev/iommu, devices and their IOMMU groups, "
        "memlock, the run-as user. Exit status 0 when the VM can launch, 1 otherwise.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_host_root(p)

    p = sub.add_parser(
        "devices",
        help="list the host's PCI devices",
        description="List PCI devices with their driver, IOMMU group and VFIO cdev.",
    )
    p.add_argument("addresses", nargs="*", metavar="ADDR", help="only these devices")
    p.add_argument("--group", metavar="N", help="only the devices of IOMMU group N")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_host_root(p)

    for name, text in (
        ("bind", "bind devices to vfio-pci, remembering their driver"),
        ("unbind", "give devices back to the driver they had before `vmrun bind`"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("addresses", nargs="+", metavar="ADDR")
        add_host_root(p)

    p = sub.add_parser(
        "prepare",
        help="bind every PCI device of a config to vfio-pci",
        description="Bind every PCI device that a config names to vfio-pci.",
    )
    p.add_argument("file", metavar="FILE")
    add_host_root(p)

    p = sub.add_parser(
        "run",
        help="launch QEMU as the config says",
        description="Open the devices, set limits, drop privileges and exec QEMU.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    add_host_root(p)
    return top


def make_plan(file: str, host_root: str) -> Plan:
    cfg = config.load(file)
    return plan(cfg, host.gather(cfg, host_root))


def cmd_validate(files: list[str]) -> int:
    status = EXIT_OK
    for file in files:
        try:
            config.load(file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            status = EXIT_USAGE
        else:
            print(f"{file}: ok")
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    p = make_plan(args.file, args.host_root)
    sys.stdout.write(render.json_text(p) if args.json else render.text(p))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from vmrun import check

    report = check.check(make_plan(args.file, args.host_root))
    if args.json:
        sys.stdout.write(json.dumps(check.to_json(report), indent=2) + "\n")
    else:
        sys.stdout.write(check.text(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def addresses(values: list[str]) -> list[str]:
    out, bad = [], []
    for value in values:
        try:
            out.append(config.pci_address(value, config.Context(base=pathlib.Path("."))))
        except config.Invalid:
            bad.append(value)
    if bad:
        raise UsageError(f"not a PCI address: {', '.join(bad)} (write DDDD:BB:DD.F or BB:DD.F)")
    return out


def cmd_devices(args: argparse.Namespace) -> int:
    from vmrun import pci

    wanted = set(addresses(args.addresses))
    devices = [
        d
        for d in pci.list_devices(host.Host(args.host_root))
        if (not wanted or d.address in wanted) and (args.group is None or d.iommu_group == args.group)
    ]
    if args.json:
        sys.stdout.write(json.dumps([attrs.asdict(d) for d in devices], indent=2) + "\n")
    else:
        sys.stdout.write(pci.table(devices))
    return EXIT_OK


def config_addresses(file: str) -> list[str]:
    cfg = config.load(file)
    out = []
    for dev in cfg.vfio:
        if dev.host is not None:
            out.append(dev.host)
        elif dev.sysfsdev is not None and config.PCI_RE.match(os.path.basename(dev.sysfsdev)):
            out.append(os.path.basename(dev.sysfsdev))
    return out


def cmd_bind(args: argparse.Namespace) -> int:
    from vmrun.bind import Binder

    binder = Binder(host.Host(args.host_root))
    if args.command == "prepare":
        changes = binder.bind(config_addresses(args.file))
    elif args.command == "bind":
        changes = binder.bind(addresses(args.addresses))
    else:
        changes = binder.unbind(addresses(args.addresses))
    for change in changes:
        print(change.render())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from vmrun.launch import launch  # only `run` needs the module with side effects

    p = make_plan(args.file, args.host_root)
    if args.dry_run:
        sys.stdout.write(render.text(p))
        return EXIT_FAILED if p.problems else EXIT_OK
    sys.stdout.flush()
    launch(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {
        "plan": cmd_plan,
        "check": cmd_check,
        "devices": cmd_devices,
        "bind": cmd_bind,
        "unbind": cmd_bind,
        "prepare": cmd_bind,
        "run": cmd_run,
    }
    try:
        if args.command == "validate":
            return cmd_validate(args.files)
        return commands[args.command](args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"vmrun {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LaunchError as e:
        print(f"vmrun: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
