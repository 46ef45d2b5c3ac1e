"""Where models live. The bundled model is ``models/tiny`` at the top of the source tree; the
``MESHLLM_MODEL`` environment variable or a command's ``--model`` overrides it."""

from __future__ import annotations

import os
from pathlib import Path

from meshllm.errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO_ROOT / "models" / "tiny"


def resolve_model_dir(model: str | os.PathLike[str] | None = None) -> Path:
    """The model directory a command should use: explicit, then $MESHLLM_MODEL, then bundled."""
    chosen = model or os.environ.get("MESHLLM_MODEL") or BUNDLED_MODEL
    path = Path(chosen).expanduser()
    if not path.is_dir():
        hint = "" if model else " (the bundled model ships in models/tiny of the source tree)"
        raise ModelError(f"model directory not found: {path}{hint}")
    return path
