"""`make demo` is a newcomer's first contact: it must run on the bundled model, mesh included, and
the mesh must answer what one process answers."""

from __future__ import annotations

import pytest

from meshllm.cli import main


@pytest.mark.slow
def test_demo_answers_through_a_mesh_what_one_process_answers(capsys: pytest.CaptureFixture[str]) -> None:
    # the bundled model is part of the source tree; its absence is a failure, not a skip
    rc = main(["demo", "--max-tokens", "16", "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 0, out
    single, mesh = out.split("== the same prompt through a mesh", 1)
    assert "class Stack:" in single and single.split("def __init__(self", 1)[1].strip()
    assert "replica 0" in mesh and "leader" in mesh
    roles = {r for r in ("PREFILL", "DECODER", "BOTH") if r in mesh}
    assert roles, mesh
    assert "the mesh answered token for token what one process answered" in mesh


def test_demo_rejects_a_mesh_of_no_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nodes", "0", "--max-tokens", "1"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err
