"""Progress bars for long work (export, import, profiling, loading blocks) that stay quiet when
stderr is not a terminal (tqdm's ``disable=None``) and when the logs are JSON lines, so a bar
never lands in a log file or between two JSON objects."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

from meshllm.obs.logs import log_format

T = TypeVar("T")


def disabled(wanted: bool = True) -> bool | None:
    """tqdm's ``disable``: True when not wanted or the logs are JSON, else None (off a terminal)."""
    return None if wanted and log_format() == "text" else True


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        wanted: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar on stderr that shows only on a terminal with text logs."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disabled(wanted), leave=False, **kw)
