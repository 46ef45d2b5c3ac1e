"""Whole nodes serving: the mesh plans itself (control plane, GA, loading), then answers prompts
through whatever plan it chose — in one event loop over the in-memory network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_node_sim import Mesh

from meshllm.model.manifest import Manifest
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import SamplingParams


@pytest.fixture
async def mesh(tiny_model_dir: Path, tmp_path: Path):
    m = Mesh(tiny_model_dir, tmp_path)
    yield m
    await m.close()


async def test_every_node_answers_through_the_plan_the_mesh_made(mesh: Mesh, tiny_manifest: Manifest) -> None:
    for i in range(4):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "one leader and one active plan on four nodes")
    full = StageRunner(tiny_manifest, 0, tiny_manifest.config.num_blocks, threads=1)
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for node in mesh.nodes:
        prompt = [int(x) for x in rng.integers(3, 97, size=int(rng.integers(1, 20)))]
        tokens = []
        async for ev in node.serving.entry.generate(prompt, params):
            assert ev.error is None, ev.error
            tokens.append(ev.token_id)
        assert tokens == list(generate(full, prompt, params).token_ids)
    await mesh.until(lambda: all(n.serving.stage.held_count() == 0 for n in mesh.nodes),
                     "every node freed every request")
    view = mesh.nodes[0].mesh_view()
    assert view["serving"]["entry"]["completed"] == 1
