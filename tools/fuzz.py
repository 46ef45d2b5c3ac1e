#!/usr/bin/env python3
"""Coverage-guided fuzzing of what a peer or a client can send a node, with atheris (libFuzzer).

    .venv/bin/pip install atheris          # where it installs (a wheel for Linux x86_64)
    .venv/bin/python tools/fuzz.py wire [-atheris_runs=200000]
    .venv/bin/python tools/fuzz.py handshake [-max_total_time=60]

``wire``: any bytes into ``Codec.decode``: a message or ``RemoteProtocolError``, nothing else.
``handshake``: decoded frames fed to both ends of the link handshake: refused, never authenticated.
Any other exception is a finding (libFuzzer saves the input that caused it). The test suite runs
hypothesis versions of both (tests/test_wire.py, tests/test_wire_auth.py) on every change.
"""

from __future__ import annotations

import contextlib
import os
import sys


def main() -> int:
    try:
        import atheris
    except ImportError:
        print("fuzz: atheris is not installed here (pip install atheris)", file=sys.stderr)
        return 2
    if len(sys.argv) < 2 or sys.argv[1] not in ("wire", "handshake"):
        print(__doc__, file=sys.stderr)
        return 2
    target = sys.argv.pop(1)
    with atheris.instrument_imports():
        from meshllm.errors import RemoteProtocolError
        from meshllm.wire.auth import NONCE_BYTES, Handshake
        from meshllm.wire.codec import Codec

    codec = Codec()

    def wire(data: bytes) -> None:
        with contextlib.suppress(RemoteProtocolError):
            codec.decode(data)

    def handshake(data: bytes) -> None:
        for initiator in (True, False):
            hs = Handshake(key=b"fuzz-mesh-key", node_id="b", mesh_id="m", nonce=os.urandom(NONCE_BYTES),
                           initiator=initiator)
            if initiator:
                hs.start()
            try:
                hs.receive(codec.decode(data))
            except RemoteProtocolError:
                continue
            if hs.done:
                raise AssertionError("a handshake authenticated a peer without the key")

    atheris.Setup(sys.argv, wire if target == "wire" else handshake)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
