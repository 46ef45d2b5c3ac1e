"""GGUF import: small files written here per tensor type -> meshllm blocks -> logits against the
numpy reference on the weights the file holds (dequantized by the ``gguf`` package). Bad files get
one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf_files import CFG, write_model

from meshllm.cli import main
from meshllm.errors import ModelError
from meshllm.model import reference
from meshllm.model.gguf_import import import_gguf
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.runner import StageRunner

IDS = np.random.default_rng(11).integers(0, CFG.vocab_size, 12)


def _logits(m: Manifest, ids: np.ndarray = IDS) -> np.ndarray:
    r = StageRunner(m, 0, m.config.num_blocks, threads=1, max_seqs=1)
    r.alloc(0, len(ids))
    return r.prefill(0, ids, last_only=False)  # (T, V)


def _check_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    scale = np.abs(want).max()
    assert scale > 1.0  # far from uniform: a wrong permutation or scale would show
    err = np.abs(got - want).max()
    assert err <= rel * scale, f"max error {err:.3g} vs logit scale {scale:.3g}"


# every type the float import dequantizes; K-quants are random blocks (the gguf package cannot
# quantize them), the others quantized from float weights
FLOAT_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float32_import_matches_dequantized_reference(tmp_path: Path, qtype: T) -> None:
    truth = write_model(tmp_path / "m.gguf", qtype)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert m.config.weight_dtype == "float32" and m.config.num_layers == CFG.num_layers
    assert m.provenance is not None and m.provenance["gguf_tensor_types"].get(qtype.name, 0) >= 7
    _check_close(_logits(m), reference.forward(IDS, truth, m.config), 1e-5)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_int4_exact_keeps_gguf_blocks_exactly(tmp_path: Path, qtype: T) -> None:
    """Q4_0 / Q4_1 / Q8_0 run on MatMulNBits without re-quantization: the exact mode computes
    what the float reference computes on the dequantized weights."""
    truth = write_model(tmp_path / "m.gguf", qtype)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="exact",
                    progress=False)
    assert m.config.weight_dtype == "int4"
    assert m.provenance is not None and m.provenance["int4_mode"] == "exact"
    assert set(m.provenance["gguf_tensor_types"]) == {qtype.name, "F32"}
    _check_close(_logits(m), reference.forward(IDS, truth, m.config), 1e-5)
    # and the stored bytes are what the manifest charges: well under float32's
    f32 = import_gguf(tmp_path / "m.gguf", tmp_path / "f32", progress=False)
    layer = 1
    on_disk = (m.root / m.blocks[layer].file).stat().st_size
    assert abs(on_disk - m.blocks[layer].cost.param_bytes) < 0.05 * on_disk
    bits = 8 if qtype == T.Q8_0 else 4
    assert m.blocks[layer].cost.param_bytes < (bits + 2.5) / 32 * f32.blocks[layer].cost.param_bytes


def test_int4_fast_mode_is_close(tmp_path: Path) -> None:
    truth = write_model(tmp_path / "m.gguf", T.Q4_1)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="fast",
                    progress=False)
    want = reference.forward(IDS, truth, m.config)
    got = _logits(m)
    # int8 activations: close, not equal
    assert np.abs(got - want).max() > 1e-5
    _check_close(got, want, 0.05)


def test_int4_fast_mode_runs_without_zero_points(tmp_path: Path) -> None:
    """The fast mode folds Q4_1's offsets so that every MatMulNBits has the default zero point
    and no zero-point input (onnxruntime's plainest int8 path)."""
    import onnx

    write_model(tmp_path / "m.gguf", T.Q4_1)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="fast", progress=False)
    for b in range(1, m.config.num_blocks):
        nodes = [n for n in onnx.load(str(m.block_path(b))).graph.node if n.op_type == "MatMulNBits"]
        assert nodes and all(len(n.input) == 3 for n in nodes), b


def test_fold_offsets_keeps_the_matrix() -> None:
    """[x, s, s] against the folded matrix equals x against the matrix with offsets, up to the
    8-bit rounding of the residuals (at most half a step of each block's residual scale)."""
    from meshllm.model.quant import BLOCK, QuantMatrix, block_indicator, fold_offsets

    rng = np.random.default_rng(5)
    N, K = 7, 3 * BLOCK
    d = (rng.random((N, K // BLOCK)) * 0.1 + 0.01).astype(np.float32)
    mins = (-rng.random((N, K // BLOCK)) * 15 * d).astype(np.float32)
    m = QuantMatrix(rng.integers(0, 16, (N, K)).astype(np.uint8), d, np.zeros(d.shape, np.uint8), mins, 4, "Q4_1")
    f = fold_offsets(m)
    assert f.mins is None and f.default_zero and f.q.max() <= 15
    ind = block_indicator(K)
    assert ind.default_zero
    x = rng.standard_normal((3, K)).astype(np.float32)
    s = x @ ind.dequantize().T  # (3, P) block sums, zero-padded
    np.testing.assert_allclose(s[:, :K // BLOCK], x.reshape(3, -1, BLOCK).sum(-1), rtol=1e-5, atol=1e-5)
    got = np.concatenate([x, s, s], axis=1) @ f.dequantize().T
    resid_step = np.abs(mins + 8 * d).max(axis=1) / 119  # (N,): one residual scale per row here
    bound = np.abs(s).sum(axis=1, keepdims=True) * resid_step[None, :] / 2  # (3, N)
    assert np.all(np.abs(got - x @ m.dequantize().T) <= bound + 1e-4)


def test_compact_mode_is_plain_4_bits(tmp_path: Path) -> None:
    """int4 "compact": every matrix 4-bit with integer zero points and no offsets (Q4_1 blocks
    keep their values and take the nearest zero point; Q8_0 is re-quantized) — fewer bytes and
    kernels than the fast mode, an approximation of the file's weights."""
    import onnx

    from meshllm.model.quant import QuantMatrix, compact4

    truth = write_model(tmp_path / "m.gguf", T.Q4_1, tensor_types={"lm_head.weight": T.Q8_0})
    fast = import_gguf(tmp_path / "m.gguf", tmp_path / "fast", weight_dtype="int4", int4_mode="fast", progress=False)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="compact", progress=False)
    assert m.provenance is not None and m.provenance["int4_mode"] == "compact"
    layer = onnx.load(str(m.block_path(1))).graph
    ops = [n.op_type for n in layer.node]
    assert "Concat" not in ops and ops.count("MatMulNBits") == 4  # no block sums, no offsets
    assert all(n.attribute[[a.name for a in n.attribute].index("bits")].i == 4
               for b in (1, m.config.num_blocks - 1)
               for n in onnx.load(str(m.block_path(b))).graph.node if n.op_type == "MatMulNBits")
    assert sum(b.cost.param_bytes for b in m.blocks[1:]) < sum(b.cost.param_bytes for b in fast.blocks[1:])
    want = reference.forward(IDS, truth, m.config)
    got = _logits(m)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
    # a Q4_1 block keeps its values and scale; only the zero point moves it, by at most d/2
    rng = np.random.default_rng(6)
    d = (rng.random((4, 2)) * 0.1 + 0.01).astype(np.float32)
    mins = (-rng.random((4, 2)) * 15 * d).astype(np.float32)
    q4_1 = QuantMatrix(rng.integers(0, 16, (4, 64)).astype(np.uint8), d, np.zeros(d.shape, np.uint8), mins, 4, "Q4_1")
    c = compact4(q4_1)
    assert c.mins is None and np.array_equal(c.q, q4_1.q) and np.array_equal(c.scale, d)
    shift = c.dequantize() - q4_1.dequantize()
    assert np.all(np.abs(shift) <= np.repeat(d, 32, axis=1) / 2 + 1e-6)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.F16], ids=lambda t: t.name)
def test_int4_requantizes_other_types(tmp_path: Path, qtype: T) -> None:
    truth = write_model(tmp_path / "m.gguf", qtype)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="exact",
                    progress=False)
    assert m.provenance is not None
    assert m.provenance["gguf_tensor_types"][f"requantized from {qtype.name}"] == 7 * CFG.num_layers + 2
    want = reference.forward(IDS, truth, m.config)
    got = _logits(m)
    # 4-bit re-quantization is an approximation: clearly off, still the same function (these
    # K-quant weights are uniformly random bits, the worst case for 16 levels)
    assert np.abs(got - want).max() > 1e-4
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9


def test_mixed_bits_in_one_layer(tmp_path: Path) -> None:
    """A Q4_0 file whose v and down projections are Q8_0 (as llama.cpp's mixes do)."""
    mixed = {f"layers.{i}.{n}": T.Q8_0 for i in range(CFG.num_layers)
             for n in ("self_attn.v_proj.weight", "mlp.down_proj.weight")}
    truth = write_model(tmp_path / "m.gguf", T.Q4_0, tensor_types=mixed)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="exact",
                    progress=False)
    _check_close(_logits(m), reference.forward(IDS, truth, m.config), 1e-5)


def test_qwen2_rows_are_not_permuted(tmp_path: Path) -> None:
    truth = write_model(tmp_path / "m.gguf", T.F32, arch="qwen2")
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert m.config.architecture == "qwen2"
    _check_close(_logits(m), reference.forward(IDS, truth, m.config), 1e-5)


def test_permutation_matters(tmp_path: Path) -> None:
    """The comparison can fail: the file's rows read as they lie give other logits."""
    truth = write_model(tmp_path / "m.gguf", T.F32)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    from gguf_files import permute_qk

    wrong = dict(truth)
    for i in range(CFG.num_layers):
        q = f"layers.{i}.self_attn.q_proj.weight"
        wrong[q] = permute_qk(truth[q], CFG.num_heads)
    assert np.abs(_logits(m) - reference.forward(IDS, wrong, m.config)).max() > 1e-2


def test_tokenizer_and_specials_from_metadata(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", T.F32)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    tok = Tokenizer.from_manifest(m)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    ids = tok.encode("the cat in the hat")
    assert ids[0] != 1  # add_bos_token is false in this file
    assert tok.decode(ids) == "the cat in the hat"
    assert tok.token_to_id("Ġthe") in ids  # merges applied
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == tok.token_to_id("<|im_start|>") == 1
    assert m.chat_template is not None and "<|im_start|>" in m.chat_template


def test_spm_tokenizer_adds_bos_and_falls_back_to_bytes(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", T.F32, tokenizer="llama")
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    tok = Tokenizer.from_manifest(m)
    ids = tok.encode("hello the cat")
    assert ids[0] == 1 and tok.id_to_token(ids[1]) == "▁hello"
    assert "▁cat" in [tok.id_to_token(i) for i in ids]
    # a character outside the pieces is spelled in byte tokens and decodes back
    ids = tok.encode("hé")
    assert tok.token_to_id("<0xC3>") in ids and tok.token_to_id("<0xA9>") in ids
    assert tok.decode(ids) == "hé"


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokenizer_matches_transformers(tmp_path: Path, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    write_model(tmp_path / "m.gguf", T.F32, tokenizer=kind)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    ours = Tokenizer.from_manifest(m)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ["the cat in the hat", "hello the cat", " leading space", "héllo wörld 123",
                 "<|im_start|>user\nhi<|im_end|>", "tabs\tand\nnewlines  twice"]:
        assert ours.encode(text) == theirs.encode(text), text


# --- bad input ----------------------------------------------------------------------------------
def _export(capsys: pytest.CaptureFixture[str], src: Path, out: Path) -> tuple[int, str]:
    rc = main(["export", "--gguf", str(src), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_not_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    rc, err = _export(capsys, bad, tmp_path / "out")
    assert rc != 0 and len(err.splitlines()) == 1 and "not a GGUF file" in err


def test_truncated_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.gguf"
    write_model(src, T.Q4_0)
    data = src.read_bytes()
    for cut in (len(data) - 1000, 2000, 30):  # in the tensor data, in the metadata, in the header
        src.write_bytes(data[:cut])
        rc, err = _export(capsys, src, tmp_path / "out")
        assert rc != 0 and len(err.splitlines()) == 1, err
        assert "truncated" in err, err


def test_unknown_tensor_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.gguf"
    write_model(src, T.Q4_0)
    data = bytearray(src.read_bytes())
    # tensor info: name (u64 length + bytes), n_dims u32, dims u64 * n, type u32, offset u64
    name = b"token_embd.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    tpos = at + 4 + 8 * n_dims
    assert int.from_bytes(data[tpos:tpos + 4], "little") == int(T.Q4_0)
    data[tpos:tpos + 4] = (250).to_bytes(4, "little")
    src.write_bytes(bytes(data))
    rc, err = _export(capsys, src, tmp_path / "out")
    assert rc != 0 and len(err.splitlines()) == 1 and "tensor type 250" in err


def test_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.gguf"
    write_model(src, T.F32, arch="bert")
    rc, err = _export(capsys, src, tmp_path / "out")
    assert rc != 0 and len(err.splitlines()) == 1 and "unsupported GGUF architecture 'bert'" in err


def test_missing_file_and_bad_pre_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    src = tmp_path / "m.gguf"
    write_model(src, T.F32, meta={"tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ModelError, match="pre-tokenizer 'mystery'"):
        import_gguf(src, tmp_path / "out", progress=False)


def test_cli_export_int4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.gguf"
    write_model(src, T.Q4_1)
    rc = main(["export", "--gguf", str(src), "--out", str(tmp_path / "out"), "--dtype", "int4",
               "--int4-mode", "exact", "--quiet"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "int4" and info["int4_mode"] == "exact"
    m = load_manifest(tmp_path / "out")
    assert info["param_bytes"] == sum(b.cost.param_bytes for b in m.blocks)


# --- quantized matrices -------------------------------------------------------------------------
def test_split8_is_exact() -> None:
    from meshllm.model.quant import BLOCK, QuantMatrix, split8

    rng = np.random.default_rng(3)
    N, K = 5, 4 * BLOCK
    m = QuantMatrix(rng.integers(0, 256, (N, K)).astype(np.uint8), rng.random((N, K // BLOCK)).astype(np.float32),
                    np.full((N, K // BLOCK), 128, np.uint8), None, 8, "Q8_0")
    s = split8(m)
    assert s.bits == 4 and s.shape == (N, 2 * K) and s.q.max() <= 15
    w = s.dequantize()
    np.testing.assert_allclose(w[:, :K] + w[:, K:], m.dequantize(), rtol=1e-6, atol=0)


def test_quantize4_round_trip_error_is_bounded() -> None:
    from meshllm.model.quant import BLOCK, quantize4

    w = np.random.default_rng(4).standard_normal((8, 3 * BLOCK)).astype(np.float32)
    q = quantize4(w)
    step = np.repeat(q.scale, BLOCK, axis=1)  # (N, K): each value's quantization step
    assert np.all(np.abs(q.dequantize() - w) <= 0.5 * step + 1e-6)
    with pytest.raises(ModelError, match="columns"):
        quantize4(np.zeros((2, 33), np.float32))


def test_int4_export_of_float_weights(tmp_path: Path) -> None:
    """`export --dtype int4` of any float model quantizes every matrix to 4 bits; the manifest
    charges the stored bytes."""
    from meshllm.model.export import export_model, random_weights
    from meshllm.model.quant import QuantMatrix, quantize4

    w = random_weights(CFG, np.random.default_rng(9))
    m = export_model(w, CFG, tmp_path, name="q", weight_dtype="int4", int4_mode="exact", progress=False)
    deq = {k: (quantize4(v).dequantize() if v.ndim == 2 else v) for k, v in w.items()}
    _check_close(_logits(m), reference.forward(IDS, deq, m.config), 1e-5)
    f32 = sum(v.nbytes for v in w.values())
    stored = sum(b.cost.param_bytes for b in m.blocks)
    assert 0.1 * f32 < stored < 0.2 * f32
    assert not isinstance(w["norm.weight"], QuantMatrix)


def test_bench_runtime_on_a_model_dir(tmp_path: Path) -> None:
    """`bench runtime --model DIR --gguf FILE --json` reports the runner's figures beside
    llama.cpp's, or says why llama.cpp is absent (`make bench` installs it). In a subprocess:
    llama-cpp-python leaves files open at module level that warn at interpreter exit."""
    import subprocess
    import sys

    src = tmp_path / "m.gguf"
    write_model(src, T.Q4_0)
    import_gguf(src, tmp_path / "out", weight_dtype="int4", progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "meshllm.cli", "bench", "runtime", "--model", str(tmp_path / "out"),
         "--gguf", str(src), "--json", "--steps", "2", "--reps", "1", "--context", "8", "--prefill", "16",
         "--threads", "1", "--no-transformers", "--no-ortgenai", "--no-spin"],
        capture_output=True, text=True, timeout=240, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("MESHLLM_")})  # a node's defaults
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    for k in ("decode_tok_s_b1", "decode_tok_s_b8", "prefill_tok_s", "roofline_fraction"):
        assert r[k] > 0, k
    assert r["rss_mb"] > r["stored_weight_mb"] > 0
    assert r["dtype"] == "int4" and r["int4_mode"] == "fast"
    # the runner's attention as a node serves by default (fused: one GroupQueryAttention per
    # layer), and the plain-operator kind beside it (one Softmax per layer)
    assert r["attention"] == "fused" and r["kernels_per_token"]["attention"] == "fused"
    assert r["kernels_per_token"]["by_op"]["GroupQueryAttention"] == CFG.num_layers
    assert "Softmax" not in r["kernels_per_token"]["by_op"]
    assert r["kernels_per_token_plain"]["by_op"]["Softmax"] == CFG.num_layers
    assert r["kernels_per_token_plain"]["total"] > r["kernels_per_token"]["total"]
    assert r["runner_plain"]["decode_tok_s_b1"] > 0 and r["decode_ratio_fused_vs_plain"] > 0
    assert r["block_steps"] == 2 and "ortgenai" not in r["notes"]  # skipped as asked, not failed
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        assert r["ratio_vs_llamacpp"] is None and "not installed" in r["notes"]["llamacpp"]
    else:
        assert r["llamacpp_decode_tok_s_b1"] > 0 and r["ratio_vs_llamacpp"] > 0


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_1], ids=lambda t: t.name)
def test_int4_embedding_gathers_exact_rows(tmp_path: Path, qtype: T) -> None:
    """The quantized embedding dequantizes only the gathered rows, to exactly the values the
    ``gguf`` package dequantizes: one GatherBlockQuantized kernel where the blocks have integer
    zero points (Q4_0, Q8_0), the gather spelled out for Q4_1's float offsets."""
    import onnx
    import onnxruntime as ort

    truth = write_model(tmp_path / "m.gguf", qtype)
    m = import_gguf(tmp_path / "m.gguf", tmp_path / "out", weight_dtype="int4", int4_mode="fast", progress=False)
    graph = onnx.load(str(m.block_path(0)))
    ops = [n.op_type for n in graph.graph.node]
    assert (ops == ["GatherBlockQuantized"]) == (qtype != T.Q4_1), ops
    sess = ort.InferenceSession(str(m.block_path(0)), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, CFG.vocab_size - 1, 5]])
    got = sess.run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(got[0], truth["embed_tokens.weight"][ids[0]].astype(np.float32))


_CRASH_ON_STEPS = """
import json, os, signal, sys
for line in sys.stdin:
    if json.loads(line)["op"] == "steps":
        os.kill(os.getpid(), signal.SIGILL)
    print(json.dumps({"rss_mb": 1.0}), flush=True)
"""


def test_a_foreign_engine_that_crashes_is_reported_not_fatal() -> None:
    """A foreign engine dying of SIGILL mid-benchmark (a native build using an instruction the
    machine refuses) is dropped with the reason; the other engines' figures stand."""
    import sys

    from meshllm.bench.harness import EngineFailed, ForeignEngine, blocked_decode

    class Counter:
        name = "counter"

        def start(self, prompts: np.ndarray) -> None:
            pass

        def steps(self, tokens: np.ndarray) -> list[float]:
            return [1.0] * len(tokens)

    crash = ForeignEngine("x", "crashy", command=[sys.executable, "-c", _CRASH_ON_STEPS])
    engines = [Counter(), crash]
    failed: dict[str, str] = {}
    times = blocked_decode(engines, np.zeros((1, 4), np.int64), np.zeros((9, 1), np.int64),
                           np.random.default_rng(0), block=4, failed=failed)
    assert times == {"counter": [1.0] * 8}
    assert [e.name for e in engines] == ["counter"]
    assert "SIGILL" in failed["crashy"]
    with pytest.raises(EngineFailed, match="llama_cpp is not installed"):
        _absent_engine()


def _absent_engine() -> None:
    """An engine whose module cannot be imported answers why, and the parent raises it."""
    import sys

    from meshllm.bench.harness import ForeignEngine

    code = ("import sys; sys.modules['llama_cpp'] = None; sys.argv = ['x', 'llamacpp', "
            "'{\"gguf\": \"x\", \"threads\": 1, \"n_ctx\": 8}']; from meshllm.bench import foreign; "
            "sys.exit(foreign.main(sys.argv[1:]))")
    ForeignEngine("llamacpp", "absent", command=[sys.executable, "-c", code])
