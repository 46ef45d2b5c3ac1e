"""Every ``meshllm node`` option in one declarative table, and the one way they are read.

Each option has a key (``port``; ``serve.max_queue`` for a key of the ``[serve]`` table), a kind,
a default, a help line, an environment variable (``MESHLLM_PORT``, ``MESHLLM_SERVE_MAX_QUEUE``) and
perhaps a command-line flag. The same table builds the argument parser, reads the environment and
the ``--config`` file (TOML, or JSON for a ``.json`` name), checks every value where it came from,
and writes the options table of ``docs/configuration.md`` (``meshllm config table``).

Precedence: flags win over the environment, the environment over the file, the file over the
defaults. A bad value is a one-line ``ConfigError`` naming its source::

    MESHLLM_PORT=abc: not an integer
    node.toml: [serve] unknown key 'foo'
    --threads 0: must be >= 1
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from meshllm.control.config import ControlConfig
from meshllm.errors import ConfigError, UserError
from meshllm.net.base import split_host_port
from meshllm.serve.config import KV_WIRE_DTYPES, ServeConfig

ENV_PREFIX = "MESHLLM_"
TABLES = ("runtime", "serve", "control", "workload")  # the file's tables; their keys are "table.key"

# --- value kinds: how a text (flag, environment) or a file value becomes a setting ---------------------


class Bad(ValueError):
    """A value that does not fit its option (the message says why, the caller says where)."""


def _int(v: Any, text: bool) -> int:
    if text:
        try:
            return int(str(v).strip())
        except ValueError:
            raise Bad("not an integer") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise Bad("not an integer")
    return v


def _float(v: Any, text: bool) -> float:
    if text:
        try:
            return float(str(v).strip())
        except ValueError:
            raise Bad("not a number") from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Bad("not a number")
    return float(v)


def _str(v: Any, text: bool) -> str:
    if not isinstance(v, str):
        raise Bad("not a string")
    return v


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _bool(v: Any, text: bool) -> bool:
    if text:
        s = str(v).strip().lower()
        if s in TRUE or s in FALSE:
            return s in TRUE
        raise Bad("not a boolean (use true or false)")
    if not isinstance(v, bool):
        raise Bad("not a boolean (use true or false)")
    return v


def _list(v: Any, text: bool) -> list[str]:
    if isinstance(v, str):  # one value, or (environment) a comma-separated list
        return [x.strip() for x in v.split(",") if x.strip()] if text else [v]
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return list(v)
    raise Bad("not a list of strings")


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``1073741824``, ``8GB`` (10^9), ``8GiB`` / ``8G`` (2^30), ``512MB``..."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise UserError(f"--memory-budget: cannot read {text!r} (use bytes or e.g. 8GB, 512MiB)")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise UserError("--memory-budget must be positive")
    return n


def parse_peer(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError:
        raise UserError(f"--peer {text!r}: expected HOST:PORT") from None


def _bytes(v: Any, text: bool) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise Bad("not a size (bytes, or e.g. 8GB, 512MiB)")
    try:
        return parse_bytes(str(v))
    except UserError:
        raise Bad("not a positive size (bytes, or e.g. 8GB, 512MiB)") from None


def _dist(v: Any, text: bool) -> Any:
    """A length distribution: a token count, or a table such as {kind = "uniform", low = 8, high = 64}."""
    from meshllm.planner.types import LengthDist

    if text:
        try:
            v = json.loads(str(v))
        except ValueError:
            raise Bad("not a token count or a JSON table") from None
    if isinstance(v, bool) or not isinstance(v, int | dict):
        raise Bad("not a token count or a table")
    try:
        return LengthDist.from_dict(v).to_dict()
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise Bad(f"not a length distribution ({e})") from None


KINDS: dict[str, Callable[[Any, bool], Any]] = {
    "int": _int, "float": _float, "str": _str, "bool": _bool, "list": _list, "size": _bytes, "length": _dist}


# --- checks on a converted value ----------------------------------------------------------------------
def at_least(n: float) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not v >= n:
            raise Bad(f"must be >= {n:g}")
    return check


def positive(v: Any) -> None:
    if not v > 0:
        raise Bad("must be positive")


def port_range(v: Any) -> None:
    if not 0 <= v < 65536:
        raise Bad("not a port (0..65535)")


def peers(v: Any) -> None:
    for p in v:
        try:
            parse_peer(p)
        except UserError:
            raise Bad(f"{p!r} is not HOST:PORT") from None


def strategy(v: Any) -> None:
    from meshllm.errors import PlanError
    from meshllm.planner.strategies import STRATEGIES, parse_strategy

    if str(v).partition(":")[0] not in STRATEGIES:
        raise Bad(f"known strategies are {', '.join(STRATEGIES)}")
    try:
        parse_strategy(v)
    except PlanError as e:
        raise Bad(str(e)) from None


def objective(v: Any) -> None:
    from meshllm.planner.strategies import OBJECTIVES

    if v not in OBJECTIVES:
        raise Bad(f"choose one of {', '.join(OBJECTIVES)}")


@dataclass(frozen=True, slots=True)
class Option:
    key: str  # "port", "serve.max_queue"
    kind: str  # a key of KINDS
    default: Any
    help: str
    flag: str | None = None  # "--port"; None: the file and the environment only
    choices: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    aliases: tuple[str, ...] = ()  # older top-level file keys for this option
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag."""
        return (self.flag or self.key).lstrip("-").replace("-", "_").replace(".", "_")

    @property
    def table(self) -> str:
        return self.key.split(".")[0] if "." in self.key else ""

    @property
    def name(self) -> str:
        return self.key.split(".")[-1]

    def convert(self, value: Any, text: bool) -> Any:
        v = KINDS[self.kind](value, text)
        if self.choices and v not in self.choices:
            raise Bad(f"choose one of {', '.join(self.choices)}")
        if self.check is not None:
            self.check(v)
        return v


# --- the table ------------------------------------------------------------------------------------------
NODE_OPTIONS: tuple[Option, ...] = (
    Option("model", "str", None, "model directory (default: the bundled model)", "--model", metavar="DIR"),
    Option("name", "str", None, "a human name for this node (default: its id)", "--name"),
    Option("host", "str", None, "address to listen on and advertise (default: the first interface's address, "
           "else listen on all and advertise the default route's)", "--host"),
    Option("port", "int", 7070, "HTTP port for the API and the links (0: any free port)", "--port",
           check=port_range),
    Option("interface", "list", [], "interface names or IPv4 addresses for mDNS (default: the host's address)",
           "--interface", metavar="IFACE"),
    Option("peer", "list", [], "static peers to connect to, HOST:PORT (for networks without multicast)", "--peer",
           check=peers, metavar="HOST:PORT"),
    Option("no_mdns", "bool", False, "do not use mDNS (static peers only)", "--no-mdns"),
    Option("mesh_key_file", "str", None, "file holding the shared mesh key (none: the mesh is open, and the node "
           "says so)", "--mesh-key-file", metavar="FILE"),
    Option("api_key_file", "str", None, "file holding the key API clients must send as `Authorization: Bearer KEY` "
           "(none: the API is open)", "--api-key-file", metavar="FILE"),
    Option("tls_cert", "str", None, "PEM certificate (chain) for HTTPS on the node's port: the API, the dashboard "
           "and the links (wss://); needs --tls-key", "--tls-cert", metavar="FILE"),
    Option("tls_key", "str", None, "PEM private key of --tls-cert", "--tls-key", metavar="FILE"),
    Option("memory_budget", "size", None, "memory this node may use, in bytes or e.g. 8GB, 512MiB (default: "
           "measured)", "--memory-budget", metavar="BYTES|GB"),
    Option("threads", "int", 1, "onnxruntime threads", "--threads", check=at_least(1)),
    Option("spin", "bool", False, "onnxruntime's threads wait for the next kernel busy instead of asleep: a "
           "faster decode step with --threads 2 or more, for a device that runs this node and nothing else "
           "(never where nodes share cores)", "--spin"),
    Option("slowdown", "float", 1.0, "make compute F times slower, to try heterogeneous meshes on one machine",
           "--slowdown", check=at_least(1), metavar="F"),
    Option("strategy", "str", "e2llm", "placement strategy the leader uses (e2llm: the GA as islands on the "
           "members; see `meshllm plan --help`); for experiments e2llm:ROLES pins the replicas' roles "
           "(e2llm:prefill,decoder, e2llm:both,both) and e2llm:N their number", "--strategy", check=strategy),
    Option("objective", "str", "waiting", "what the planner minimises: latency, throughput or waiting",
           "--objective", check=objective),
    Option("priority", "int", 0, "leader preference (higher wins)", "--priority"),
    Option("islands", "int", 0, "GA islands per planning round (0: one per member, at most 4)", "--islands",
           check=at_least(0)),
    Option("state_dir", "str", None, "where the node id and profile cache live (default: "
           "~/.local/state/meshllm/node-PORT)", "--state-dir", metavar="DIR"),
    Option("profile_dir", "str", None, "where measured profiles are cached instead, shared by the nodes of one "
           "machine (a profile is keyed by model, machine, threads, slowdown and attention kind; default: "
           "STATE_DIR/profiles)", "--profile-dir", metavar="DIR"),
    Option("log_level", "str", "info", "log level", "--log-level", choices=("debug", "info", "warning")),
    Option("log_format", "str", "text", "log lines as text or JSON", "--log-format", choices=("text", "json")),
)

# Help for the keys of the [serve], [control] and [workload] tables; their defaults come from the
# dataclasses, and tests/test_config.py checks that every field has a line here.
SERVE_HELP = {
    "prefill_chunk": "prompt tokens per prefill chunk",
    "max_queue": "requests this node holds as an entry (running and waiting) before answering 429",
    "queue_timeout_s": "seconds a request may wait for KV room before 503",
    "reserve_timeout_s": "seconds a decoder replica has to answer an admission request",
    "handoff_timeout_s": "KV reserved for a hand-off that never completes is freed after this many seconds",
    "eager_handoff": "send a prompt to its PREFILL replica together with the reservation at its DECODER (when "
                     "that reports room), saving the reservation's round trip from the time to first token",
    "busy_handback": "a replica that prefills its own requests hands a prompt back to its entry when more prompts "
                     "are queued there than the entry counted (sent by other entries a moment before), and the "
                     "entry routes it again",
    "early_kv_mib": "MiB of hand-off KV a node keeps for a reservation that has not reached it yet",
    "stall_timeout_s": "an attempt with no sign of progress (a prefilled chunk, a token) for this many seconds "
                       "fails and resumes elsewhere",
    "stall_factor": "a prefill may also take this many times the router's estimate before it counts as stalled",
    "step_token_budget": "tokens one scheduler iteration of a stage computes: decode rows first, then prefill "
                         "chunks (at least one)",
    "step_timeout_s": "a decode step of a ring with no answer for this many seconds fails its rows",
    "tombstone_s": "seconds a stage remembers a freed request, so its late frames allocate nothing",
    "kv_wire_dtype": "dtype of the KV a prefill replica hands to a decoder (float32: exact; float16: half the bytes)",
    "load_report_s": "period of a replica's load report, in seconds (it also reports within 50 ms of a change in its requests)",
    "max_batch": "sequences a decoder replica decodes at once",
    "retry_after_s": "the Retry-After of a 429 or 503, in seconds",
    "max_migrations": "times a request whose replica fails may resume elsewhere",
    "migrate_wait_s": "seconds a resumed request waits for an intact replica",
    "keepalive_s": "a streaming answer idle this many seconds gets a keep-alive (SSE comment, empty NDJSON chunk)",
    "speculate": "speculative decoding by prompt lookup on this node's decoder rings (a request's speculate "
                 "overrides it; the tokens are the same either way); with runtime.attention auto it also picks "
                 "plain attention, which verifies drafts in one pass",
    "spec_max_draft": "draft tokens a decode step may carry per request (adapted to its acceptance)",
    "spec_cost_aware": "draft only as much as pays at the step times measured on the ring (off: the length "
                       "adapted to acceptance alone)",
    "inline_step_ms": "a decode step expected to take at most this many ms runs on the event loop where its frame "
                      "landed instead of the inference thread (0: always the thread)",
    "wake_qos": "while this node's stages decode, ask the kernel for a CPU wake-up latency of 0 "
                "(/dev/cpu_dma_latency, needs write access): idle cores poll instead of halting between a "
                "ring's frames (machine-wide, a power cost; let go 0.5 s after the last step)",
    "hop_delay_ms": "lab only: hold every control frame a stage sends to another node this many ms",
}
CONTROL_HELP = {
    "heartbeat_interval": "seconds between heartbeats",
    "suspect_after": "missed heartbeats before a member is suspected (and loses leadership)",
    "dead_after": "missed heartbeats before a member is declared dead",
    "election_timeout": "seconds a candidate waits for votes",
    "election_backoff": "seconds to wait after a denied or timed-out campaign",
    "discovery_grace": "seconds without a campaign at start, to see the peers first",
    "replan_debounce": "seconds of membership churn batched into one re-plan",
    "profile_timeout": "seconds the leader waits for members' profiles",
    "island_deadline": "seconds before GA islands not returned are evolved locally",
    "island_generations": "GA generations per island",
    "plan_ack_timeout": "seconds before a proposed epoch not acknowledged by all is aborted",
    "replan_backoff": "seconds to wait after an aborted epoch",
    "drain_timeout": "seconds before a draining epoch is unloaded anyway",
    "drift_window": "requests kept by the workload drift detector",
    "drift_min_samples": "requests seen before drift is judged",
    "drift_ratio": "observed mean this many times above or below the planned one is drift",
}
# runtime/attention.py's SETTINGS (settings.py stays clear of onnxruntime; tests/test_config.py checks)
ATTENTION_SETTINGS = ("auto", "fused", "plain")
RUNTIME_OPTIONS: tuple[Option, ...] = (
    Option("runtime.attention", "str", "auto", "the attention every node of the mesh runs, chosen once by the "
           "mesh's first plan (a node follows the plan's kind whatever its own setting): fused (onnxruntime's "
           "GroupQueryAttention, the faster step; a request's drafts verify one position at a time), plain "
           "(plain operators: drafts verify in one pass); auto: plain where serve.speculate is on, else fused. "
           "Either way a request's tokens do not depend on speculation", "--attention",
           choices=ATTENTION_SETTINGS),
)
WORKLOAD_OPTIONS: tuple[Option, ...] = (
    Option("workload.arrival_rate", "float", 1.0, "requests per second the planner plans for",
           check=at_least(0)),
    Option("workload.input_len", "length", 32, "prompt length: tokens, or a distribution table "
           "({kind = \"uniform\", low = 8, high = 64}; kinds fixed, uniform, lognormal)"),
    Option("workload.output_len", "length", 96, "generated length, as input_len"),
    Option("workload.max_batch", "int", 8, "sequences a replica decodes at once, in the plan", check=at_least(1)),
    Option("workload.kv_percentile", "float", 99.0, "length percentile whose KV must fit for max_batch sequences"),
)
FLAGGED = {"serve.max_queue": "--max-queue", "serve.kv_wire_dtype": "--kv-wire-dtype"}


def _kind_of(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}[type(value)]


def _from_dataclass(table: str, cls: type, help_: Mapping[str, str]) -> tuple[Option, ...]:
    out = []
    for f in fields(cls):
        default = f.default  # plain values: a field with a factory would need a kind of its own
        assert default is not MISSING, f"{cls.__name__}.{f.name} needs a plain default"
        key = f"{table}.{f.name}"
        choices = KV_WIRE_DTYPES if key == "serve.kv_wire_dtype" else ()
        flag = FLAGGED.get(key)
        out.append(Option(key, _kind_of(default), default, help_.get(f.name, ""), flag, choices=choices,
                          aliases=(f.name,) if flag else ()))
    return tuple(out)


OPTIONS: tuple[Option, ...] = (NODE_OPTIONS + RUNTIME_OPTIONS + _from_dataclass("serve", ServeConfig, SERVE_HELP)
                               + _from_dataclass("control", ControlConfig, CONTROL_HELP) + WORKLOAD_OPTIONS)
BY_KEY = {o.key: o for o in OPTIONS}
CONFIG_ENV = ENV_PREFIX + "CONFIG"


# --- argparse ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, options: Sequence[Option] = OPTIONS) -> None:
    """The flags of the table, and ``--config``. Every flag defaults to None (not given), so the
    environment, the file and the defaults below it stay visible; values are checked later, where
    each one's source is known."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"TOML (or .json) file with these options (default: ${CONFIG_ENV})")
    for o in options:
        if o.flag is None:
            continue
        help_ = f"{o.help} (env {o.env}" + (f"; default {show_value(o.default)})" if o.default not in (None, []) else ")")
        if o.kind == "bool":
            p.add_argument(o.flag, dest=o.dest, action="store_true", default=None, help=help_)
        elif o.kind == "list":
            p.add_argument(o.flag, dest=o.dest, action="append", default=None, metavar=o.metavar,
                           help=help_ + "; repeatable")
        else:
            p.add_argument(o.flag, dest=o.dest, default=None, metavar=o.metavar,
                           choices=o.choices or None, help=help_)


# --- reading -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Settings:
    values: dict[str, Any]  # key -> value
    sources: dict[str, str]  # key -> "default" | "file PATH" | "env VAR" | "flag --x"
    config_file: str | None
    origins: dict[str, str]  # key -> how it was written: "--port 7071", "MESHLLM_PORT=7071", "n.toml: port = 7071"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def table(self, name: str) -> dict[str, Any]:
        """The keys of one table (``serve``...) as keyword arguments."""
        return {k.split(".", 1)[1]: v for k, v in self.values.items() if k.startswith(name + ".")}

    def given(self, name: str) -> list[str]:
        """Where the table's values that are not defaults came from (for an error message)."""
        return sorted({s for k, s in self.sources.items() if k.startswith(name + ".") and s != "default"})


def read_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options")
    return data


def _norm(key: str) -> str:
    return str(key).replace("-", "_")


def flatten_file(data: Mapping[str, Any], path: str) -> dict[str, tuple[Any, str]]:
    """File keys as table keys (``serve.max_queue``) with where each one is written; unknown keys
    are an error."""
    aliases = {a: o.key for o in OPTIONS for a in o.aliases}
    out: dict[str, tuple[Any, str]] = {}
    for k, v in data.items():
        k = _norm(k)
        if k in TABLES:
            if not isinstance(v, dict):
                raise ConfigError(f"{path}: [{k}] must be a table")
            for sub, sv in v.items():
                key = f"{k}.{_norm(sub)}"
                if key not in BY_KEY:
                    raise ConfigError(f"{path}: [{k}] unknown key {sub!r}")
                out[key] = (sv, f"{path}: [{k}] {_norm(sub)}")
        elif k in aliases:
            out[aliases[k]] = (v, f"{path}: {k}")
        elif k in BY_KEY and "." not in k:
            out[k] = (v, f"{path}: {k}")
        else:
            near = [o.key for o in OPTIONS if "." not in o.key]
            hint = _near(k, near)
            raise ConfigError(f"{path}: unknown key {k!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
    return out


def _near(word: str, known: Sequence[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, known, n=1)
    return m[0] if m else None


def resolve(flags: Any = None, env: Mapping[str, str] | None = None,
            options: Sequence[Option] = OPTIONS) -> Settings:
    """The effective settings: each option from its flag, else its environment variable, else the
    config file, else its default; every value checked where it came from."""
    env = dict(env or {})
    flags = flags if flags is not None else argparse.Namespace()
    config = getattr(flags, "config", None) or env.get(CONFIG_ENV) or None
    in_file = flatten_file(read_file(config), config) if config else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    origins: dict[str, str] = {}
    for o in options:
        flag_value = getattr(flags, o.dest, None) if o.flag else None
        if flag_value is not None and flag_value is not False and flag_value != []:
            flag = o.flag or ""
            shown = " ".join(f"{flag} {x}" for x in flag_value) if isinstance(flag_value, list) else (
                flag if flag_value is True else f"{flag} {flag_value}")
            raw, text, src, where = flag_value, True, f"flag {o.flag}", shown
            if isinstance(flag_value, list):
                text = False  # repeated flags: already a list
        elif o.env in env:
            raw, text, src, where = env[o.env], True, f"env {o.env}", f"{o.env}={env[o.env]}"
        elif o.key in in_file:
            raw, (text, src) = in_file[o.key][0], (False, f"file {config}")
            where = f"{in_file[o.key][1]} = {show_value(raw)}"
        else:
            values[o.key], sources[o.key], origins[o.key] = o.default, "default", f"default {o.key}"
            continue
        try:
            values[o.key] = o.convert(raw, text)
        except Bad as e:
            raise ConfigError(f"{where}: {e}") from None
        sources[o.key], origins[o.key] = src, where
    return Settings(values, sources, config, origins)


def attention_setting(env: Mapping[str, str] | None = None, config: str | None = None) -> tuple[str, bool]:
    """(``runtime.attention``, ``serve.speculate``) as a ``meshllm node`` started with this
    environment (and ``config`` file, else ``$MESHLLM_CONFIG``) reads them: what single-process
    paths checked against such a mesh (``meshllm generate``, the benchmarks) choose their attention
    kind from (``runtime.attention.choose``)."""
    s = resolve(argparse.Namespace(config=config), env,
                options=(BY_KEY["runtime.attention"], BY_KEY["serve.speculate"]))
    return s["runtime.attention"], s["serve.speculate"]


def profile_dir_setting(env: Mapping[str, str] | None = None, config: str | None = None) -> Path | None:
    """``profile_dir`` as a ``meshllm node`` started with this environment (and ``config`` file)
    reads it: where a launcher that profiles its nodes before they start (``premeasure_states``)
    must put the profiles for them to find."""
    v = resolve(argparse.Namespace(config=config), env, options=(BY_KEY["profile_dir"],))["profile_dir"]
    return Path(v) if v else None


def show_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {show_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    return "" if v is None else str(v)


# --- documentation -----------------------------------------------------------------------------------------
DOC_START = "<!-- options table: generated by `meshllm config table`; do not edit by hand -->"
DOC_END = "<!-- end of options table -->"


def markdown_table(options: Sequence[Option] = OPTIONS) -> str:
    rows = ["| file key | flag | environment | type | default | meaning |", "|---|---|---|---|---|---|"]
    for o in options:
        key = f"`[{o.table}]` `{o.name}`" if o.table else f"`{o.key}`"
        flag = f"`{o.flag}`" if o.flag else ""
        kind = o.kind if not o.choices else " \\| ".join(o.choices)
        default = f"`{show_value(o.default)}`" if o.default not in (None, []) else ""
        meaning = o.help.replace("|", "\\|")
        rows.append(f"| {key} | {flag} | `{o.env}` | {kind} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def doc_block(text: str) -> str:
    """The generated table inside a document (between its markers)."""
    m = re.search(re.escape(DOC_START) + r"\n(.*?)" + re.escape(DOC_END), text, re.S)
    if m is None:
        raise ConfigError("the document has no options table markers")
    return m.group(1)


def with_table(text: str) -> str:
    """The document with its options table regenerated."""
    doc_block(text)
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    return head + DOC_START + "\n" + markdown_table() + DOC_END + tail
