"""A node's state directory: where it lives by default, and the node id kept in it across
restarts (the profile cache lives there too, ``runtime/profile.py``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from meshllm.errors import UserError


def default_state_dir(port: int) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshllm" / f"node-{port}"


def stable_node_id(state_dir: Path) -> str:
    """The node's id, created once and kept in the state directory across restarts."""
    path = state_dir / "node_id"
    try:
        nid = path.read_text().strip()
        if nid:
            return nid
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    nid = uuid.uuid4().hex[:16]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(nid + "\n")
    except OSError as e:
        raise UserError(f"cannot write the node id to {path}: {e.strerror}") from None
    return nid
