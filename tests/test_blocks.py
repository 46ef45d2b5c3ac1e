"""ONNX blocks compute what the numpy reference computes (atol 1e-4 on float32 logits)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from meshllm.errors import ModelError
from meshllm.model import reference
from meshllm.model.blocks import build_block, build_monolithic
from meshllm.model.config import ModelConfig, block_costs
from meshllm.model.export import export_model, random_weights
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.runtime.runner import StageRunner, bind_buffer, session_options

ATOL = 1e-4


def _ids(cfg: ModelConfig, n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n)


def _full_logits(manifest: Manifest, ids: np.ndarray) -> np.ndarray:
    r = StageRunner(manifest, 0, manifest.config.num_blocks, threads=1, max_seqs=1)
    r.alloc("s", len(ids))
    return r.prefill("s", ids, last_only=False)  # (T, V)


def test_chained_blocks_match_reference(tiny_manifest: Manifest, tiny_weights: dict[str, np.ndarray]) -> None:
    cfg = tiny_manifest.config
    ids = _ids(cfg, 24)
    want = reference.forward(ids, tiny_weights, cfg)  # (T, V) float64
    got = _full_logits(tiny_manifest, ids)
    assert got.shape == want.shape
    # the model is far from uniform: errors of the size a wrong rotation makes would show
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_each_block_matches_reference(tiny_manifest: Manifest, tiny_weights: dict[str, np.ndarray]) -> None:
    """Every block alone, fed the reference's input, gives the reference's output."""
    cfg = tiny_manifest.config
    ids = _ids(cfg, 10, seed=3)
    hs = reference.hidden_states(ids, tiny_weights, cfg)  # [embed, layer 0, ...], each (T, H)
    for b in range(cfg.num_blocks):
        r = StageRunner(tiny_manifest, b, b + 1, threads=1, max_seqs=1)
        r.alloc(0, len(ids))
        x = ids if b == 0 else hs[b - 1].astype(np.float32)
        got = r.prefill(0, x, last_only=False)
        want = hs[b] if b <= cfg.num_layers else reference.head(hs[-1], tiny_weights, cfg)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"block {b}")


def test_reference_is_sensitive_to_rope(tiny_manifest: Manifest, tiny_weights: dict[str, np.ndarray]) -> None:
    """The comparison above can fail: a different RoPE base moves the logits far beyond atol."""
    cfg = tiny_manifest.config
    ids = _ids(cfg, 24)
    other = reference.forward(ids, tiny_weights, dataclasses.replace(cfg, rope_theta=500.0))
    assert np.abs(_full_logits(tiny_manifest, ids) - other).max() > 100 * ATOL


@pytest.mark.parametrize(("tied", "bias", "dtype"), [(True, False, "float32"), (False, True, "float32"),
                                                    (True, True, "float32"), (True, False, "float16")])
def test_variants_match_reference(tmp_path: Path, tied: bool, bias: bool, dtype: str) -> None:
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position=32, tie_word_embeddings=tied, qkv_bias=bias,
                      rope_theta=1e6, rms_norm_eps=1e-6)
    w = random_weights(cfg, np.random.default_rng(5))
    assert ("lm_head.weight" in w) == (not tied)
    assert ("layers.0.self_attn.q_proj.bias" in w) == bias
    m = export_model(w, cfg, tmp_path, name="v", weight_dtype=dtype, progress=False)
    ids = _ids(cfg, 12)
    w = {k: v.astype(dtype).astype(np.float32) for k, v in w.items()}  # what the files hold
    np.testing.assert_allclose(_full_logits(m, ids), reference.forward(ids, w, cfg), atol=ATOL, rtol=0)


def test_float16_weights_match_reference_on_rounded_weights(tmp_path: Path, tiny_config: ModelConfig,
                                                             tiny_weights: dict[str, np.ndarray]) -> None:
    m = export_model(tiny_weights, tiny_config, tmp_path, name="h", weight_dtype="float16", progress=False)
    assert m.config.weight_dtype == "float16"
    assert m.costs[1].param_bytes == block_costs(tiny_config)[1].param_bytes // 2
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in tiny_weights.items()}
    ids = _ids(tiny_config, 16)
    got = _full_logits(m, ids)
    np.testing.assert_allclose(got, reference.forward(ids, rounded, tiny_config), atol=ATOL, rtol=0)
    # and the rounding is visible: fp16 weights are not the fp32 model
    assert np.abs(got - reference.forward(ids, tiny_weights, tiny_config)).max() > ATOL


def test_float16_files_are_about_half(tmp_path: Path, tiny_config: ModelConfig,
                                      tiny_weights: dict[str, np.ndarray]) -> None:
    a = export_model(tiny_weights, tiny_config, tmp_path / "a", name="a", progress=False)
    b = export_model(tiny_weights, tiny_config, tmp_path / "b", name="b", weight_dtype="float16", progress=False)
    size = [sum((m.root / blk.file).stat().st_size for blk in m.blocks) for m in (a, b)]
    assert 0.45 < size[1] / size[0] < 0.6


def test_monolithic_graph_matches_reference(tiny_config: ModelConfig, tiny_weights: dict[str, np.ndarray]) -> None:
    cfg = tiny_config
    model = build_monolithic(tiny_weights, cfg)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    ids = _ids(cfg, 9)
    T = len(ids)
    io = sess.io_binding()
    io.bind_cpu_input("input_ids", ids[None].astype(np.int64))
    io.bind_cpu_input("seqlens_k", np.array([T - 1], np.int32))
    io.bind_cpu_input("total_sequence_length", np.array(T, np.int32))
    io.bind_output("logits", "cpu")  # first bound output is get_outputs()[0]
    caches = []
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            buf = np.zeros((1, cfg.num_kv_heads, cfg.max_position, cfg.head_dim), np.float32)
            caches.append(buf)
            bind_buffer(io, f"past_{kind}.{i}", buf, output=False)
            bind_buffer(io, f"present_{kind}.{i}", buf, output=True)
    sess.run_with_iobinding(io)
    logits = io.get_outputs()[0].numpy()[0]
    np.testing.assert_allclose(logits, reference.forward(ids, tiny_weights, cfg), atol=ATOL, rtol=0)
    assert np.abs(caches[0][0, :, :T]).max() > 0 and not caches[0][0, :, T:].any()


def test_manifest_records_costs_and_tokenizer(tmp_path: Path, tiny_config: ModelConfig,
                                              tiny_weights: dict[str, np.ndarray]) -> None:
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "stub"}')
    m = export_model(tiny_weights, tiny_config, tmp_path / "m", name="named", tokenizer_file=tok,
                     chat_template="{{ x }}", progress=False)
    assert m.name == "named"
    assert m.costs == block_costs(tiny_config)
    assert [b.file for b in m.blocks] == ["embed.onnx", "layer.0.onnx", "layer.1.onnx", "layer.2.onnx",
                                         "head.onnx"]
    assert m.tokenizer_path is not None and m.tokenizer_path.read_text() == tok.read_text()
    assert m.tokenizer_path.name == "tokenizer.json"
    assert m.chat_template == "{{ x }}"


def test_tampered_block_is_refused(tmp_path: Path, tiny_config: ModelConfig,
                                   tiny_weights: dict[str, np.ndarray]) -> None:
    export_model(tiny_weights, tiny_config, tmp_path, name="t", progress=False)
    f = tmp_path / "layer.1.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_manifest(tmp_path)


def test_block_path_outside_model_dir_is_refused(tmp_path: Path, tiny_config: ModelConfig,
                                                 tiny_weights: dict[str, np.ndarray]) -> None:
    d = tmp_path / "m"
    export_model(tiny_weights, tiny_config, d, name="t", progress=False)
    (tmp_path / "evil.onnx").write_bytes((d / "head.onnx").read_bytes())
    doc = json.loads((d / "manifest.json").read_text())
    doc["blocks"][-1]["file"] = "../evil.onnx"
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="outside the model directory"):
        load_manifest(d)


def test_corrupt_block_file_is_a_model_error(tmp_path: Path, tiny_config: ModelConfig,
                                             tiny_weights: dict[str, np.ndarray]) -> None:
    export_model(tiny_weights, tiny_config, tmp_path, name="t", progress=False)
    (tmp_path / "head.onnx").write_bytes(b"not an onnx model")
    m = load_manifest(tmp_path, verify=False)
    with pytest.raises(ModelError, match="cannot load"):
        StageRunner(m, 0, m.config.num_blocks, threads=1)


def test_export_checks_weights(tmp_path: Path, tiny_config: ModelConfig,
                               tiny_weights: dict[str, np.ndarray]) -> None:
    w = dict(tiny_weights)
    del w["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelError, match="missing"):
        export_model(w, tiny_config, tmp_path, name="x", progress=False)
    w = dict(tiny_weights)
    w["norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(ModelError, match="shape"):
        export_model(w, tiny_config, tmp_path, name="x", progress=False)
    with pytest.raises(ModelError, match="weight_dtype"):
        export_model(tiny_weights, tiny_config, tmp_path, name="x", weight_dtype="int8", progress=False)


def test_unsupported_head_dim_is_a_model_error(tiny_weights: dict[str, np.ndarray]) -> None:
    cfg = ModelConfig(vocab_size=10, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=3,
                      num_kv_heads=1, max_position=8)
    with pytest.raises(ModelError, match="head_dim"):
        build_block(random_weights(cfg, np.random.default_rng(0)), cfg, 1)


@pytest.mark.parametrize("fuse", [True, False])
def test_external_weight_files_match_reference_and_are_verified(tmp_path: Path, tiny_config: ModelConfig,
                                                                tiny_weights: dict[str, np.ndarray],
                                                                fuse: bool) -> None:
    m = export_model(tiny_weights, tiny_config, tmp_path, name="x", external_data=True, progress=False)
    assert sorted(f for f, _ in m.extra_files) == sorted(b.file + ".data" for b in m.blocks)
    assert all((tmp_path / b.file).stat().st_size < 4096 for b in m.blocks)  # weights are outside
    ids = _ids(tiny_config, 11)
    r = StageRunner(m, 0, tiny_config.num_blocks, threads=1, max_seqs=1, fuse=fuse)
    r.alloc(0, 11)
    np.testing.assert_allclose(r.prefill(0, ids, last_only=False), reference.forward(ids, tiny_weights, tiny_config),
                               atol=ATOL, rtol=0)
    data = tmp_path / "layer.0.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_manifest(tmp_path)


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def test_residual_add_and_norm_fuse_within_a_layer(tiny_config: ModelConfig,
                                                   tiny_weights: dict[str, np.ndarray]) -> None:
    """A layer block emits its middle residual add + norm as one SkipSimplifiedLayerNormalization;
    a fused range keeps each block's graph as it is (no fusion across the seams between blocks)."""
    from meshllm.model.blocks import fuse_blocks

    L = tiny_config.num_layers
    layer = build_block(tiny_weights, tiny_config, 1)
    assert _ops(layer)["SkipSimplifiedLayerNormalization"] == 1
    assert _ops(layer)["SimplifiedLayerNormalization"] == 1
    body = list(range(0, L + 1))
    fused = fuse_blocks([build_block(tiny_weights, tiny_config, b) for b in body], body)
    ops = _ops(fused)
    assert ops["SkipSimplifiedLayerNormalization"] == L and ops["SimplifiedLayerNormalization"] == L


@pytest.mark.parametrize("stored", ["bundled", "fresh"])
def test_a_split_range_computes_what_one_range_computes_bit_for_bit(
        stored: str, bundled_manifest: Manifest, tiny_config: ModelConfig, tiny_weights: dict[str, np.ndarray],
        tmp_path: Path) -> None:
    """Wherever a model is cut into stages, the stages compute exactly what one process does
    (prefill and decode), for a model stored by an earlier version (models/tiny) and one exported
    now; and one session per block equals the fused range."""
    if stored == "bundled":
        m = bundled_manifest
    else:
        export_model(tiny_weights, tiny_config, tmp_path / "m", name="t", progress=False)
        m = load_manifest(tmp_path / "m")
    n = m.config.num_blocks
    ids = _ids(m.config, 9)

    def run(ranges: list[tuple[int, int]], fuse: bool = True) -> tuple[np.ndarray, np.ndarray]:
        rs = [StageRunner(m, a, b, threads=1, max_seqs=1, fuse=fuse) for a, b in ranges]
        for r in rs:
            r.alloc(0, 11)
        x: np.ndarray = ids
        for r in rs:
            x = r.prefill(0, x, last_only=False)
        y: np.ndarray = np.array([4])
        for r in rs:
            y = r.decode([0], y)
        return x, y

    whole = run([(0, n)])
    for ranges, fuse in (([(0, 2), (2, n)], True), ([(0, 1), (1, n - 1), (n - 1, n)], True), ([(0, n)], False)):
        got = run(ranges, fuse)
        np.testing.assert_array_equal(got[0], whole[0])
        np.testing.assert_array_equal(got[1], whole[1])


def test_kernels_per_step_are_counted(tiny_manifest: Manifest, tiny_weights: dict[str, np.ndarray],
                                      tmp_path: Path) -> None:
    """The profiler's count of a decode step: per layer one GroupQueryAttention kernel (the block
    files' attention) or, on a runner that verifies drafts in one pass, one softmax and two
    in-place cache writes (``runtime/attention``), and one fused residual norm; and a runner
    without profiling refuses to count."""
    cfg = tiny_manifest.config
    export_model(tiny_weights, cfg, tmp_path / "m", name="t", progress=False)
    m = load_manifest(tmp_path / "m")
    counted = {}
    for one_pass in (False, True):
        r = StageRunner(m, 0, cfg.num_blocks, threads=1, max_seqs=1, profile_prefix=str(tmp_path / f"p{one_pass}"),
                        one_pass=one_pass)
        r.alloc(0, 16)
        r.prefill(0, _ids(cfg, 8))
        for _ in range(3):
            r.decode([0], np.array([5]))
        total, by_op = r.kernels_per_step(3)
        assert by_op["SkipSimplifiedLayerNormalization"] == pytest.approx(cfg.num_layers)
        assert total == pytest.approx(sum(by_op.values())) and total > 3 * cfg.num_layers
        counted[one_pass] = (total, by_op)
    gqa, rows = counted[False][1], counted[True][1]
    assert gqa["GroupQueryAttention"] == pytest.approx(cfg.num_layers) and "Softmax" not in gqa
    assert "GroupQueryAttention" not in rows
    assert rows["Softmax"] == pytest.approx(cfg.num_layers)
    assert rows["ScatterND"] == pytest.approx(2 * cfg.num_layers)
    assert counted[True][0] > counted[False][0] + 10 * cfg.num_layers  # what GQA saves a step
    plain = StageRunner(tiny_manifest, 0, cfg.num_blocks, threads=1, max_seqs=1)
    with pytest.raises(ModelError, match="profile_prefix"):
        plain.kernels_per_step(1)


def test_spinning_threads_change_no_number(tiny_manifest: Manifest) -> None:
    cfg = tiny_manifest.config
    ids = _ids(cfg, 6)
    outs = []
    for spin in (False, True):
        r = StageRunner(tiny_manifest, 0, cfg.num_blocks, threads=2, max_seqs=1, spin=spin)
        r.alloc(0, 8)
        outs.append((r.prefill(0, ids), r.decode([0], np.array([2]))))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
