"""``meshllm bench mesh``: the one process and the mesh take turns, round by round, and each
per-hop figure pairs a round's mesh with the same round's one process."""

from __future__ import annotations

import json
import statistics

import pytest

from meshllm.cli import main


def test_the_one_process_and_the_mesh_take_turns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "mesh", "--nodes", "2", "--preset", "tiny", "--json", "--rounds", "3", "--tokens", "8",
                 "--concurrent", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rounds"] == 3 and out["stages"] == 2 and out["errors"] == 0
    rounds = out["per_hop_overhead_ms_rounds"]
    assert len(rounds) == 3
    assert out["per_hop_overhead_ms"] == pytest.approx(statistics.median(rounds), abs=1e-3)
    assert out["single_decode_ms"] > 0 and out["mesh_decode_ms"] > 0 and out["mesh_compute_ms"] > 0
    assert 0 < out["ttft_ms"] < 60_000 and out["aggregate_tok_s_8"] > 0
