"""`make demo` is a newcomer's first contact: it must run on the bundled model, mesh included."""

from __future__ import annotations

import pytest

from meshllm.cli import main


def test_demo_generates_then_shows_a_ready_mesh(capsys: pytest.CaptureFixture[str]) -> None:
    # the bundled model is part of the source tree; its absence is a failure, not a skip
    rc = main(["demo", "--nodes", "2", "--max-tokens", "12", "--timeout", "90"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "class Stack:" in out
    generated = out.split("class Stack:\n    def __init__(self", 1)[1].split("== a mesh", 1)[0]
    assert generated.strip(), "the bundled model generated nothing"
    assert "READY" in out
    assert "leader" in out and "replica 0" in out


def test_demo_rejects_a_mesh_of_no_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nodes", "0", "--max-tokens", "1"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err
