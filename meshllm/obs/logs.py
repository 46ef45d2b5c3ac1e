"""Logs that say which node and which request they are about.

Two context variables, ``node`` and ``request_id``, are bound where work for a node or a request
starts (a frame dispatched to a node, a request accepted by the entry, a job queued for the
inference thread) and ``ContextFilter`` copies them onto every record. asyncio tasks copy the
context they are created in; threads do not, so what crosses to an executor runs under
``contextvars.copy_context().run``. Several nodes share one process in tests (in-memory meshes),
so the node is bound per dispatch, never process-wide, except by ``meshllm node`` itself
(``set_default_node``).

Formats: ``text`` (the default, for people) and ``json`` (one object a line: ``ts``, ``level``,
``logger``, ``msg``, ``node``, and ``request_id`` when the line is about a request; ``exc`` with
a traceback).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Coroutine, Iterator
from typing import IO, Any, TypeVar

FORMATS = ("text", "json")

node_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("meshllm_node", default=None)
request_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("meshllm_request_id", default=None)

_default_node: str | None = None
T = TypeVar("T")

# what a client may send as X-Request-Id: a short token that is safe in a log line and a header
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def set_default_node(name: str | None) -> None:
    """The node of lines logged outside any bound context (only where one node runs per process)."""
    global _default_node
    _default_node = name or None


def client_request_id(value: str | None) -> str | None:
    """A client's ``X-Request-Id`` if it is a usable token (1-64 of ``A-Za-z0-9._:-``), else None."""
    if value is None:
        return None
    value = value.strip()
    return value if _CLIENT_ID.fullmatch(value) else None


@contextlib.contextmanager
def bound(*, node: str | None = None, request_id: str | None = None) -> Iterator[None]:
    """Bind ``node`` and/or ``request_id`` (None: leave as is) for the code inside."""
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    if node is not None:
        tokens.append((node_var, node_var.set(node)))
    if request_id is not None:
        tokens.append((request_var, request_var.set(request_id)))
    try:
        yield
    finally:
        for var, tok in reversed(tokens):
            var.reset(tok)


def context_with(*, node: str | None = None, request_id: str | None = None) -> contextvars.Context:
    """A copy of the current context with ``node`` / ``request_id`` bound (for a task or a thread)."""
    ctx = contextvars.copy_context()

    def bind() -> None:
        if node is not None:
            node_var.set(node)
        if request_id is not None:
            request_var.set(request_id)

    ctx.run(bind)
    return ctx


def spawn(coro: Coroutine[Any, Any, T], *, node: str | None = None, request_id: str | None = None) -> Any:
    """``asyncio`` task for ``coro`` whose log lines carry ``node`` / ``request_id``."""
    import asyncio

    return asyncio.get_running_loop().create_task(coro, context=context_with(node=node, request_id=request_id))


class ContextFilter(logging.Filter):
    """Give every record ``node`` and ``request_id`` attributes: what ``extra=`` set, else the bound
    context, else the process default (node) or None. Attach it to handlers so that it sees the
    records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "node", None) is None:
            record.node = node_var.get() or _default_node
        if getattr(record, "request_id", None) is None:
            record.request_id = request_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601, ms), level, logger, msg, node, request_id."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        d: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                             "msg": record.getMessage(), "node": getattr(record, "node", None)}
        rid = getattr(record, "request_id", None)
        if rid is not None:
            d["request_id"] = rid
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            d["stack"] = record.stack_info
        return json.dumps(d, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-12-01 16:40:00,123 I meshllm.serve.entry [a req=3f2c-4]: message``: the node and the
    request in brackets when known, so a person can follow one request through the log."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s%(where)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        node = getattr(record, "node", None)
        if node:
            parts.append(str(node))
        rid = getattr(record, "request_id", None)
        if rid:
            parts.append(f"req={rid}")
        record.where = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def make_handler(fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the context filter and the chosen format."""
    if fmt not in FORMATS:
        from meshllm.errors import UserError

        raise UserError(f"--log-format {fmt!r}: choose one of {', '.join(FORMATS)}")
    h = logging.StreamHandler(stream if stream is not None else sys.stderr)
    h.addFilter(ContextFilter())
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return h


_installed: logging.Handler | None = None


def setup_logging(fmt: str = "text", level: int | str = logging.INFO, *, stream: IO[str] | None = None) -> None:
    """Configure the root logger for a command: one handler in ``fmt`` (replacing the one a previous
    call installed), ``level``, and the chatty libraries (zeroconf, aiohttp's access log) at warning."""
    global _installed
    root = logging.getLogger()
    handler = make_handler(fmt, stream)
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    _installed = handler
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for noisy in ("zeroconf", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_format() -> str:
    """The format of the handler ``setup_logging`` installed ("text" when none)."""
    return "json" if _installed is not None and isinstance(_installed.formatter, JsonFormatter) else "text"
