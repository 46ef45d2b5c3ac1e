"""``meshllm config``: the node's effective configuration, and the table that documents it.

    meshllm config show [--config FILE] [node flags...] [--json]
    meshllm config table [--write FILE]

``show`` resolves the options exactly as ``meshllm node`` would (flags, then ``MESHLLM_…``
environment variables, then the config file, then defaults) and prints each value with where it
came from: ``default``, ``file PATH``, ``env VAR`` or ``flag --x``. A bad value is the same one-line
error the node would give. ``table`` prints the Markdown table of every option (the one in
``docs/configuration.md``); ``--write FILE`` regenerates it inside that document.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from meshllm.errors import UserError
from meshllm.settings import OPTIONS, add_arguments, markdown_table, resolve, show_value, with_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the node's effective configuration and where each value came from")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    show = verbs.add_parser("show", help="the effective options of `meshllm node` with these flags, and their "
                                         "sources")
    add_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON: {key: {value, source, env}}")
    show.set_defaults(func=run_show)
    table = verbs.add_parser("table", help="the Markdown table of every option (docs/configuration.md)")
    table.add_argument("--write", default=None, metavar="FILE",
                       help="regenerate the table inside FILE (between its markers) instead of printing it")
    table.set_defaults(func=run_table)


def run_show(args: argparse.Namespace) -> int:
    conf = resolve(args, os.environ)
    if args.json:
        doc: dict[str, Any] = {"config_file": conf.config_file, "options": {
            o.key: {"value": conf.values[o.key], "source": conf.sources[o.key], "env": o.env} for o in OPTIONS}}
        print(json.dumps(doc, indent=1))
        return 0
    via = "flag --config" if getattr(args, "config", None) else "env MESHLLM_CONFIG"
    print(f"config file: {conf.config_file} ({via})" if conf.config_file else "config file: none")
    rows = [(o.key, show_value(conf.values[o.key]) or "-", conf.sources[o.key]) for o in OPTIONS]
    w0, w1 = max(len(r[0]) for r in rows), min(40, max(len(r[1]) for r in rows))
    print(f"{'option':{w0}}  {'value':{w1}}  source")
    for key, value, source in rows:
        print(f"{key:{w0}}  {value:{w1}}  {source}")
    return 0


def run_table(args: argparse.Namespace) -> int:
    if args.write is None:
        print(markdown_table(), end="")
        return 0
    path = Path(args.write)
    try:
        text = path.read_text()
        path.write_text(with_table(text))
    except OSError as e:
        raise UserError(f"cannot rewrite {path}: {e.strerror}") from None
    return 0
