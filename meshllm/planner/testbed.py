"""Testbed files (TOML, written by hand) -> devices and network. The only I/O of the planner
lives here, at the edge: :func:`load_testbed` reads a path, :func:`parse_testbed` takes text.

Format::

    [[device]]
    name = "agx"            # with count = 12 expands to agx-1 ... agx-12
    count = 12
    memory_gb = 32          # GiB
    tflops = 3.33
    mem_bw_gbs = 204.8
    source = true           # optional: where prompts enter; first expanded device only

    [network]
    default_mbps = 50
    default_rtt_ms = 1
    [[network.link]]
    a = "agx-1"
    b = "rtx3090"
    mbps = 1
    rtt_ms = 5              # optional

    [workload]               # optional: defaults for ``meshllm plan``
    arrival_rate = 2.0
    input_len = {kind = "lognormal", mean = 256, sigma = 0.8, high = 2048}
    output_len = 96
    max_batch = 8
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.errors import ConfigError
from meshllm.planner.types import Device, Link, Network, Workload

_DEVICE_KEYS = {"name", "count", "memory_gb", "tflops", "mem_bw_gbs", "source"}


@dataclass(frozen=True, slots=True)
class Testbed:
    devices: tuple[Device, ...]
    network: Network
    workload: Workload | None = None


def parse_testbed(text: str, where: str = "testbed") -> Testbed:
    """Parse testbed TOML text. Every problem is a :class:`ConfigError` naming ``where``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    unknown = set(doc) - {"device", "network", "workload"}
    if unknown:
        raise ConfigError(f"{where}: unknown sections {sorted(unknown)}")
    raw = doc.get("device")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: needs at least one [[device]]")
    devices: list[Device] = []
    for i, d in enumerate(raw):
        devices.extend(_devices(d, f"{where}: device #{i + 1}"))
    names = [d.name for d in devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: duplicate device names {dup}")
    net = _network(doc.get("network", {}), set(names), where)
    wl = None
    if "workload" in doc:
        try:
            wl = Workload.from_dict(doc["workload"])
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: invalid [workload]: {e}") from None
    return Testbed(tuple(devices), net, wl)


def load_testbed(path: str | Path) -> Testbed:
    """Read and parse a testbed file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read testbed {p}: {e.strerror}") from None
    return parse_testbed(text, str(p))


def _devices(d: Any, where: str) -> list[Device]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(d) - _DEVICE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        name = str(d["name"])
        count = int(d.get("count", 1))
        mem, tf, bw = float(d["memory_gb"]), float(d["tflops"]), float(d["mem_bw_gbs"])
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if count < 1:
        raise ConfigError(f"{where}: count must be >= 1")
    source = bool(d.get("source", False))
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    return [Device.from_spec(n, mem, tf, bw, source and i == 0) for i, n in enumerate(names)]


def _network(d: Any, names: set[str], where: str) -> Network:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: [network] must be a table")
    unknown = set(d) - {"default_mbps", "default_rtt_ms", "link"}
    if unknown:
        raise ConfigError(f"{where}: [network] unknown keys {sorted(unknown)}")
    links = []
    for i, ln in enumerate(d.get("link", [])):
        try:
            a, b = str(ln["a"]), str(ln["b"])
            link = Link(a, b, float(ln["mbps"]), None if "rtt_ms" not in ln else float(ln["rtt_ms"]))
        except KeyError as e:
            raise ConfigError(f"{where}: link #{i + 1}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: link #{i + 1}: {e}") from None
        for n in (a, b):
            if n not in names:
                raise ConfigError(f"{where}: link #{i + 1}: unknown device {n!r}")
        links.append(link)
    try:
        return Network(float(d.get("default_mbps", 1000.0)), float(d.get("default_rtt_ms", 1.0)),
                       tuple(links))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: [network]: {e}") from None
