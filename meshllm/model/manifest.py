"""``manifest.json``: what a model directory holds and what each block costs.

Schema (version 1)::

    {
      "format": "meshllm-model", "version": 1,
      "name": "tiny",
      "config": {...ModelConfig.to_dict()...},
      "tokenizer": {"file": "tokenizer.json", "sha256": "...", "chat_template": "..."} | null,
      "blocks": [
        {"index": 0, "name": "embed", "kind": "embed", "file": "embed.onnx", "sha256": "...",
         "param_bytes": ..., "flops_per_token": ..., "attn_flops_per_token_per_ctx": ...,
         "activation_bytes_per_token": ..., "kv_bytes_per_token": ...},
        ... one per decoder layer ("layer.0" ...), then "head"
      ],
      "extra_files": [{"file": "...", "sha256": "..."}]      # e.g. external weight data
      "model_id": "<sha256 over the config and every block's sha256>",
      "provenance": {"source": "...gguf", "int4_mode": "fast", ...}   # optional, informative
    }

Loading checks the structure, refuses any file path that leaves the model directory, and (unless
told not to) verifies every sha256. Every failure is a ``ModelError`` with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.errors import ModelError
from meshllm.model.config import BlockCost, ModelConfig

MANIFEST_NAME = "manifest.json"
FORMAT = "meshllm-model"
VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class BlockEntry:
    cost: BlockCost
    file: str
    sha256: str

    @property
    def index(self) -> int:
        return self.cost.index

    @property
    def name(self) -> str:
        return self.cost.name


@dataclass(frozen=True, slots=True)
class Manifest:
    root: Path
    name: str
    config: ModelConfig
    blocks: tuple[BlockEntry, ...]
    tokenizer_file: str | None
    tokenizer_sha256: str | None
    chat_template: str | None
    extra_files: tuple[tuple[str, str], ...]
    model_id: str
    provenance: dict[str, Any] | None = None  # where the weights came from (not hashed)

    def block_path(self, index: int) -> Path:
        return self.root / self.blocks[index].file

    @property
    def tokenizer_path(self) -> Path | None:
        return self.root / self.tokenizer_file if self.tokenizer_file else None

    @property
    def costs(self) -> list[BlockCost]:
        return [b.cost for b in self.blocks]


def compute_model_id(config: ModelConfig, block_hashes: list[str]) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for s in block_hashes:
        h.update(s.encode())
    return h.hexdigest()


def _inside(root: Path, rel: str, what: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise ModelError(f"manifest: {what} has no file name")
    p = (root / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(root.resolve()):
        raise ModelError(f"manifest: {what} file {rel!r} is outside the model directory {root}")
    return p


def _check_file(root: Path, rel: str, sha: str, what: str, verify: bool) -> None:
    p = _inside(root, rel, what)
    if not p.is_file():
        raise ModelError(f"model file missing: {p} ({what})")
    if verify:
        got = sha256_file(p)
        if got != sha:
            raise ModelError(f"sha256 mismatch for {p} ({what}): manifest says {sha[:12]}…, "
                             f"file is {got[:12]}… — the file is corrupt or was changed")


def load_manifest(model_dir: str | Path, verify: bool = True) -> Manifest:
    root = Path(model_dir)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ModelError(f"model directory not found: {root}")
    if not mpath.is_file():
        raise ModelError(f"no {MANIFEST_NAME} in {root}: not a meshllm model directory "
                         f"(make one with `meshllm export`)")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {mpath}: {e}") from None
    return manifest_from_dict(raw, root, verify=verify)


def manifest_from_dict(raw: Any, root: Path, verify: bool = True) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ModelError(f"{root / MANIFEST_NAME}: not a meshllm model manifest")
    if raw.get("version") != VERSION:
        raise ModelError(f"manifest version {raw.get('version')!r} is not supported (want {VERSION})")
    try:
        config = ModelConfig.from_dict(raw["config"])
        blocks: list[BlockEntry] = []
        for i, b in enumerate(raw["blocks"]):
            if b["index"] != i:
                raise ModelError(f"manifest: block {i} has index {b['index']}")
            cost = BlockCost(index=i, name=b["name"], kind=b["kind"], param_bytes=int(b["param_bytes"]),
                             flops_per_token=int(b["flops_per_token"]),
                             attn_flops_per_token_per_ctx=int(b.get("attn_flops_per_token_per_ctx", 0)),
                             activation_bytes_per_token=int(b["activation_bytes_per_token"]),
                             kv_bytes_per_token=int(b["kv_bytes_per_token"]))
            blocks.append(BlockEntry(cost, str(b["file"]), str(b["sha256"])))
        tok = raw.get("tokenizer")
        extra = tuple((str(e["file"]), str(e["sha256"])) for e in raw.get("extra_files", []))
        model_id = str(raw["model_id"])
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"malformed manifest in {root}: {type(e).__name__}: {e}") from None
    if len(blocks) != config.num_blocks:
        raise ModelError(f"manifest lists {len(blocks)} blocks, config implies {config.num_blocks}")
    for b in blocks:
        _check_file(root, b.file, b.sha256, f"block {b.name}", verify)
    for f, s in extra:
        _check_file(root, f, s, "extra file", verify)
    if tok:
        _check_file(root, tok["file"], tok["sha256"], "tokenizer", verify)
    if verify and model_id != compute_model_id(config, [b.sha256 for b in blocks]):
        raise ModelError(f"manifest model_id does not match its config and blocks in {root}")
    return Manifest(root=root, name=str(raw.get("name", root.name)), config=config,
                    blocks=tuple(blocks),
                    tokenizer_file=tok["file"] if tok else None,
                    tokenizer_sha256=tok["sha256"] if tok else None,
                    chat_template=tok.get("chat_template") if tok else None,
                    extra_files=extra, model_id=model_id,
                    provenance=raw["provenance"] if isinstance(raw.get("provenance"), dict) else None)


def write_manifest(root: Path, name: str, config: ModelConfig, block_files: list[str],
                   costs: list[BlockCost], tokenizer_file: str | None = None,
                   chat_template: str | None = None, extra_files: list[str] | None = None,
                   provenance: dict[str, Any] | None = None) -> Path:
    """Hash the files already written under ``root`` and write ``manifest.json``."""
    hashes = [sha256_file(root / f) for f in block_files]
    blocks = []
    for c, f, s in zip(costs, block_files, hashes, strict=True):
        blocks.append({"index": c.index, "name": c.name, "kind": c.kind, "file": f, "sha256": s,
                       "param_bytes": c.param_bytes, "flops_per_token": c.flops_per_token,
                       "attn_flops_per_token_per_ctx": c.attn_flops_per_token_per_ctx,
                       "activation_bytes_per_token": c.activation_bytes_per_token,
                       "kv_bytes_per_token": c.kv_bytes_per_token})
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": name, "config": config.to_dict(),
        "tokenizer": None, "blocks": blocks,
        "extra_files": [{"file": f, "sha256": sha256_file(root / f)} for f in (extra_files or [])],
        "model_id": compute_model_id(config, hashes),
    }
    if provenance:
        doc["provenance"] = provenance
    if tokenizer_file:
        doc["tokenizer"] = {"file": tokenizer_file, "sha256": sha256_file(root / tokenizer_file),
                            "chat_template": chat_template}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
