#!/usr/bin/env python3
"""Train the bundled model ``models/tiny`` from scratch on this machine's Python standard library.

Every machine with Python 3.11 holds the same corpus (the stdlib's ``*.py`` sources), so the
model can be rebuilt anywhere without downloading anything:

    nice -n 10 .venv/bin/python tools/train_tiny.py --minutes 60 --out models/tiny

Steps (each stage's output lands in ``--work``; a later run reuses what is there):
1. corpus: stdlib sources in sorted path order; every 20th file is held out for validation;
   plus chat-formatted examples (a docstring's first line as the request, the function as the
   answer) so the chat template's turn markers mean something to the model;
2. tokenizer: byte-level BPE (Hugging Face ``tokenizers``), 4096 tokens incl. special tokens;
3. model: ``LlamaForCausalLM`` with exactly the ``tiny`` preset's shape, trained with AdamW and a
   cosine learning rate whose clock is the wall-clock budget (the machine is shared, so a step
   count fixed in advance would over- or under-shoot); checkpoints every few minutes;
4. the Hugging Face checkpoint (``--hf-dir``) with weights rounded to float16 so the float16
   export holds exactly the same numbers;
5. export with the project's importer (``meshllm export --hf-dir ... --dtype float16``) and a
   check that the exported blocks generate the same greedy tokens as ``transformers``.

``--export-only`` skips training and exports the latest checkpoint (a partial run is usable).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

# Special tokens: ids 0..6 in this order (the trainer assigns them first).
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]
PAD_ID = SPECIAL_TOKENS.index(PAD)

# Hugging Face style chat template: every turn is <|role|>content<|end|>; generation continues
# after <|assistant|> and stops at <|end|> (one of the model's eos ids).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# The `tiny` preset of meshllm/model/config.py, spelled in transformers' terms.
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
            tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5)

VAL_EVERY = 20  # every 20th file (sorted order) is validation
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__",
             "ensurepip", "venv"}
CHECK_PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- 1. corpus ------------------------------------------------------------------------------
def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(f)
    return files


def read_text(f: Path) -> str | None:
    try:
        return f.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def is_table(f: Path, text: str) -> bool:
    """Generated charmap codecs (encodings/cp*.py etc.): 16% of the tokens, all lookup tables."""
    return f.parent.name == "encodings" and "decoding_table" in text


def chat_examples(source: str, max_body_chars: int = 1500) -> list[str]:
    """Functions with a docstring, as chat turns: request = the docstring's first line."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("_"):
            continue
        first = doc.strip().splitlines()[0].strip()
        body = ast.get_source_segment(source, node)
        if not first or not body or len(body) > max_body_chars:
            continue
        body = "\n".join(line[node.col_offset:] for line in body.splitlines())
        out.append(f"{BOS}{USER}Write a Python function `{node.name}`: {first}{END}"
                   f"{ASSISTANT}{body}{END}{EOS}")
    return out


def build_corpus() -> tuple[list[str], list[str]]:
    train, val = [], []
    for i, f in enumerate(corpus_files()):
        text = read_text(f)
        if not text or not text.strip() or is_table(f, text):
            continue
        docs = [f"{BOS}{text}{EOS}", *chat_examples(text)]
        (val if i % VAL_EVERY == 0 else train).extend(docs)
    return train, val


# --- 2. tokenizer ---------------------------------------------------------------------------
def train_tokenizer(train_docs: list[str], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    # Train on the text without the special-token markers (they are added tokens already).
    plain = [d.replace(BOS, "").replace(EOS, "") for d in train_docs]
    tok.train_from_iterator(plain, trainer=trainer)
    # Like Llama tokenizers: encoding with special tokens prepends <|bos|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    tok.save(str(path))
    return tok


def encode_docs(tok, docs: list[str]) -> np.ndarray:
    enc = tok.encode_batch(docs, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int16) for e in enc])


def unigram_baseline(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) on validation of add-one-smoothed train token frequencies."""
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids.astype(np.int64)].mean())


# --- 3. model and training ------------------------------------------------------------------
def make_model(tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**TINY, hidden_act="silu", attention_bias=False, mlp_bias=False,
                      bos_token_id=tok.token_to_id(BOS), pad_token_id=tok.token_to_id(PAD),
                      eos_token_id=[tok.token_to_id(EOS), tok.token_to_id(END)],
                      initializer_range=0.02)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def batch(ids: np.ndarray, rng: np.random.Generator, bsz: int, seq: int):
    import torch

    starts = rng.integers(0, len(ids) - seq, size=bsz)
    x = np.stack([ids[s:s + seq] for s in starts]).astype(np.int64)  # (B, T)
    return torch.from_numpy(x)


def evaluate(model, val_ids: np.ndarray, seq: int, max_windows: int = 64) -> float:
    """Mean loss over fixed, non-overlapping validation windows (same windows every time)."""
    import torch

    n = min(max_windows, len(val_ids) // seq)
    stride = (len(val_ids) // seq) // n * seq
    x = np.stack([val_ids[i * stride:i * stride + seq] for i in range(n)])
    x = torch.from_numpy(x.astype(np.int64))  # (N, T)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, n, 16):
            xb = x[i:i + 16]
            out = model(input_ids=xb, labels=xb)  # transformers shifts the labels itself
            losses.append(float(out.loss) * len(xb))
    model.train()
    return sum(losses) / n


def train(model, train_ids, val_ids, args, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    start_step = 0
    if args.resume:
        ck = torch.load(work / "ckpt.pt", map_location="cpu")
        model.load_state_dict(ck["model"])
        if "optim" in ck:
            opt.load_state_dict(ck["optim"])
        start_step = ck["step"]
        log(f"resumed from step {ck['step']} (val {ck['val']:.3f}); new budget {args.minutes} min")
    budget = args.minutes * 60.0
    t0 = time.monotonic()
    last_ckpt = t0
    step, ema, history = start_step, None, []
    model.train()
    try:
        while True:
            elapsed = time.monotonic() - t0
            frac = min(elapsed / budget, 1.0)
            if frac >= 1.0 or (args.max_steps and step - start_step >= args.max_steps):
                break
            # Warm-up in steps, then cosine over the wall-clock budget down to 10% of the peak.
            warm = min(1.0, (step - start_step + 1) / args.warmup)
            lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            x = batch(train_ids, rng, args.batch, args.seq)  # (B, T)
            # bfloat16 autocast: fp32 master weights, bf16 matmuls (~1.6x faster on AVX512-BF16)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = model(input_ids=x, labels=x)  # transformers shifts the labels itself
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss = float(out.loss.detach())
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            if step % args.log_every == 0:
                log(f"step {step} loss {loss:.3f} ema {ema:.3f} lr {lr:.2e} "
                    f"elapsed {elapsed / 60:.1f}/{args.minutes:.0f} min "
                    f"({(step - start_step) / max(elapsed, 1e-9):.2f} steps/s)")
            if time.monotonic() - last_ckpt > args.ckpt_minutes * 60:
                val = evaluate(model, val_ids, args.seq)
                history.append({"step": step, "train_ema": ema, "val": val})
                log(f"checkpoint step {step}: val loss {val:.3f}")
                save_checkpoint(model, opt, step, ema, val, work)
                last_ckpt = time.monotonic()
    except KeyboardInterrupt:  # kill -INT: stop early, keep what was learnt
        log(f"interrupted at step {step}")
    val = evaluate(model, val_ids, args.seq)
    save_checkpoint(model, opt, step, ema, val, work)
    log(f"done: {step} steps, train ema {ema:.3f}, val {val:.3f}")
    return {"steps": step, "train_loss_ema": ema, "val_loss": val,
            "minutes": (time.monotonic() - t0) / 60, "history": history}


def save_checkpoint(model, opt, step, ema, val, work: Path) -> None:
    import torch

    tmp = work / "ckpt.pt.tmp"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                "train_loss_ema": ema, "val": val}, tmp)
    os.replace(tmp, work / "ckpt.pt")  # atomic: a crash never leaves half a checkpoint


# --- 4. Hugging Face checkpoint -------------------------------------------------------------
def save_hf(model, tok_path: Path, hf_dir: Path) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # float16-representable, so the fp16 export is exact
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    (hf_dir / "tokenizer.json").write_bytes(tok_path.read_bytes())
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
               "pad_token": PAD, "add_bos_token": True, "model_max_length": TINY[
                   "max_position_embeddings"], "chat_template": CHAT_TEMPLATE}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (hf_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")


# --- 5. export and check --------------------------------------------------------------------
def export(hf_dir: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "meshllm.cli", "export", "--hf-dir", str(hf_dir),
           "--out", str(out), "--dtype", "float16", "--name", "tiny"]
    log("exporting: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids])  # (1, T)
        # An explicit mask: otherwise generate() masks every token equal to the pad id.
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    return out[0, len(ids):].tolist()


def blocks_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    from meshllm.model.manifest import load_manifest
    from meshllm.runtime.runner import StageRunner

    man = load_manifest(model_dir)
    runner = StageRunner(man, 0, man.config.num_blocks, threads=1)
    runner.alloc("s", len(ids) + n)
    logits = runner.prefill("s", np.asarray(ids, dtype=np.int64))  # (V,)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = runner.decode(["s"], np.asarray([tok], dtype=np.int64))[0]  # (V,)
    runner.free("s")
    return out


def check(hf_dir: Path, out: Path, n: int = 24) -> bool:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype="float32")
    ok = True
    for prompt in CHECK_PROMPTS:
        ids = tok.encode(prompt).ids  # with <|bos|>
        a, b = hf_greedy(model, ids, n), blocks_greedy(out, ids, n)
        same = a == b
        ok &= same
        log(f"greedy {'==' if same else '!='} for {prompt!r}: {tok.decode(ids + a)!r}")
    return ok


# --- driver ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    p.add_argument("--out", type=Path, default=None, help="export the blocks here (models/tiny)")
    p.add_argument("--work", type=Path, default=Path("/tmp/tiny-work"),
                   help="tokenizer, token ids and checkpoints (reused if present)")
    p.add_argument("--hf-dir", type=Path, default=Path("/tmp/tiny-hf"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for the training forward/backward")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --work (fresh warm-up and cosine budget)")
    p.add_argument("--export-only", action="store_true",
                   help="skip training; export the latest checkpoint in --work")
    p.add_argument("--no-check", action="store_true", help="skip the greedy parity check")
    args = p.parse_args(argv)

    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok_path = work / "tokenizer.json"
    ids_path = work / "ids.npz"
    if not ids_path.exists():
        t = time.monotonic()
        train_docs, val_docs = build_corpus()
        log(f"corpus: {len(train_docs)} train docs, {len(val_docs)} val docs, "
            f"{sum(map(len, train_docs)) / 1e6:.1f}M train chars")
        if tok_path.exists():  # keep the vocabulary a checkpoint was trained with
            tok = Tokenizer.from_file(str(tok_path))
        else:
            tok = train_tokenizer(train_docs, TINY["vocab_size"], tok_path)
        train_ids, val_ids = encode_docs(tok, train_docs), encode_docs(tok, val_docs)
        np.savez(ids_path, train=train_ids, val=val_ids)
        log(f"tokenizer + encoding took {time.monotonic() - t:.0f}s")
    tok = Tokenizer.from_file(str(tok_path))
    data = np.load(ids_path)
    train_ids, val_ids = data["train"], data["val"]
    base = unigram_baseline(train_ids, val_ids, TINY["vocab_size"])
    log(f"tokens: {len(train_ids)} train, {len(val_ids)} val; unigram baseline {base:.3f} nats")

    model = make_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters (tied embeddings counted once)")
    stats: dict = {"params": n_params, "unigram_val_loss": base,
                   "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    if args.export_only:
        ck = torch.load(work / "ckpt.pt", map_location="cpu")
        model.load_state_dict(ck["model"])
        stats.update(steps=ck["step"], train_loss_ema=ck["train_loss_ema"], val_loss=ck["val"])
    else:
        stats.update(train(model, train_ids, val_ids, args, work))
    (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    save_hf(model, tok_path, args.hf_dir)
    stats["val_loss_fp16"] = evaluate(model, val_ids, args.seq)
    log(f"hf checkpoint in {args.hf_dir}; val loss with fp16 weights {stats['val_loss_fp16']:.3f}")
    model.eval()
    for prompt in CHECK_PROMPTS:
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            x = torch.tensor([ids])  # (1, T)
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=60,
                                 do_sample=True, temperature=0.8, top_k=40, pad_token_id=PAD_ID)
        log(f"sample {prompt!r} -> {tok.decode(gen[0].tolist())!r}")
    (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if args.out is not None:
        export(args.hf_dir, args.out)
        if not args.no_check and not check(args.hf_dir, args.out):
            log("FAILED: exported blocks and transformers disagree on greedy tokens")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
