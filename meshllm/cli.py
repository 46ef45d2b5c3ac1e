"""The ``meshllm`` command. Each subcommand lives in ``meshllm/commands/<name>.py`` with a
``register(subparsers)`` function; its handler returns an exit code. Any ``MeshError`` becomes a
one-line message on stderr and its exit code, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from meshllm.errors import MeshError

COMMANDS = ["export", "fetch", "generate", "plan", "simulate", "bench", "node", "status", "replan", "demo", "up",
            "prompt", "keygen", "config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshllm", description=__doc__.split(".")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        # imported by name so that each command's heavy imports wait until it runs
        importlib.import_module(f"meshllm.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except MeshError as e:
        print(f"meshllm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
