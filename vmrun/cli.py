"""The `vmrun` command: validate, plan and run VM configs.

Exit status: 0 success; 1 the host cannot do what the config asks, or the launch failed;
2 bad input (config errors, wrong command line). Errors never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vmrun import __version__, config, host, render
from vmrun.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, LaunchError
from vmrun.plan import Plan, plan


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
    try:
        if args.command == "validate":
            return cmd_validate(args.files)
        if args.command == "plan":
            return cmd_plan(args)
        return cmd_run(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except LaunchError as e:
        print(f"vmrun: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
