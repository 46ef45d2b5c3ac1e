"""`make demo` is a newcomer's first contact: it must run on the bundled model, mesh included, and
the mesh must answer what one process answers."""

from __future__ import annotations

import re

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
    # the planner chooses the split for the stream the demo states (nothing forces the roles)
    assert "PREFILL" in mesh and "DECODER" in mesh and "BOTH" not in mesh, mesh
    served = mesh.split("how the mesh served it", 1)[1]
    pre = next(ln for ln in served.splitlines() if " PREFILL " in ln)
    dec = next(ln for ln in served.splitlines() if " DECODER " in ln)
    assert "prefilled the prompt" in pre and "sent" in pre and "decoded" not in pre, served
    # 15 tokens after the prefill's first, in at most 15 steps (fewer when speculation's drafts are kept)
    steps = re.search(r"decoded \((\d+) steps\)", dec)
    assert steps is not None and 1 <= int(steps.group(1)) <= 15, served
    assert "received" in dec and "prefilled" not in dec, served
    sent = float(pre.split("sent ")[1].split(" KiB")[0])
    assert sent > 0 and f"received {sent:.1f} KiB" in dec, served
    assert "the mesh answered token for token what one process answered" in mesh


def test_demo_rejects_a_mesh_of_no_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nodes", "0", "--max-tokens", "1"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err
