"""The `meshattn` command: parse, run, report. The only package that reads argv and the
environment; nothing imports it.

    options.py   the parsers and the configurations built from them
    checks.py    bad input refused in the parent, before any worker starts
    commands.py  train, bench and profile: check, launch, report
    generate.py  generate: its flags, its checks, launch, report
    plan.py      plan: check, search or evaluate, report (no workers)
"""

from __future__ import annotations

import sys

from ..config import ConfigError
from .commands import bench_command, profile_command, train_command
from .generate import generate_command
from .options import build_parser
from .plan import plan_command

COMMANDS = {"train": train_command, "bench": bench_command, "profile": profile_command, "plan": plan_command,
            "generate": generate_command}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except ConfigError as e:
        print(f"meshattn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
