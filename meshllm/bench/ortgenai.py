"""onnxruntime-genai's own CPU int4 build of a GGUF model's weights, for the runtime benchmark.

transformers loads the GGUF file (dequantized to float32); its state dict is copied into a model
made from the same config (a plain Hugging Face model, with nothing of the GGUF loader left) and
saved with its tokenizer; onnxruntime-genai's model builder (``onnxruntime_genai.models.builder
-p int4 -e cpu``, its defaults: blocks of 32, accuracy level 4) turns that into its ONNX model. The
result is cached (``<cache>/ortgenai/<gguf stem>-int4-cpu``); every step runs in child processes,
so a failing builder is an error message, not a crash of the benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from meshllm.errors import ModelError

_SAVE_HF = """
import sys, torch, transformers
gguf_dir, gguf_name, out = sys.argv[1:4]
kw = {"gguf_file": gguf_name}
cfg = transformers.AutoConfig.from_pretrained(gguf_dir, **kw)
src = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32, **kw)
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.load_state_dict(src.state_dict())
model.save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(gguf_dir, **kw).save_pretrained(out)
"""


def ortgenai_model_dir(gguf: Path, cache_root: Path) -> Path:
    return cache_root / "ortgenai" / f"{gguf.stem}-int4-cpu"


def ensure_ortgenai_model(gguf: Path, cache_root: Path, timeout_s: float = 1800) -> Path:
    """The builder's model directory for ``gguf`` (built on the first call, then reused)."""
    dest = ortgenai_model_dir(gguf, cache_root)
    if (dest / "genai_config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".build-"))
    try:
        hf, out = tmp / "hf", tmp / "onnx"
        steps = [[sys.executable, "-c", _SAVE_HF, str(gguf.parent), gguf.name, str(hf)],
                 [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                  "-p", "int4", "-e", "cpu", "-c", str(tmp / "cache")]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"status {proc.returncode}"]
                raise ModelError(f"building the onnxruntime-genai model failed: {tail[0][:300]}")
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
