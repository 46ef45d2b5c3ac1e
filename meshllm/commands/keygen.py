"""``meshllm keygen FILE``: write a fresh random key (for ``--mesh-key-file`` or ``--api-key-file``).

The file is created with mode 0600 and never overwritten; give the same mesh key file to every
node of a mesh (it authenticates every peer link), and the API key to the clients you trust.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from meshllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="write a fresh random mesh or API key to a file (mode 0600)")
    p.add_argument("file", metavar="FILE", help="where to write the key (must not exist)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{path} exists; keygen never overwrites a key") from None
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    print(path)
    return 0
