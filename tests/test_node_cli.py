"""`meshllm node` / `status` / `replan` option handling and output, without starting a mesh."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from meshllm.cli import main
from meshllm.commands.node import build_options, parse_bytes, parse_peer, primary_ipv4
from meshllm.commands.status import format_table
from meshllm.errors import UserError
from meshllm.state import stable_node_id


def test_memory_budgets_and_peers_parse() -> None:
    assert parse_bytes("1073741824") == 1 << 30
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("8GiB") == parse_bytes("8g") == 8 << 30
    assert parse_bytes("1.5 MiB") == 3 << 19
    for bad in ("lots", "-1GB", "0", "5 parsecs"):
        with pytest.raises(UserError):
            parse_bytes(bad)
    assert parse_peer("10.0.0.2:7070") == ("10.0.0.2", 7070)
    assert parse_peer("[fd00::2]:7070") == ("fd00::2", 7070)
    for bad in ("10.0.0.2", "host:", ":7070", "h:99999"):
        with pytest.raises(UserError):
            parse_peer(bad)


def _args(**kw):
    import argparse

    base = dict(model=None, name=None, host=None, port=None, interface=None, peer=None, no_mdns=False,
                mesh_key_file=None, memory_budget=None, threads=None, slowdown=None, priority=None,
                strategy=None, objective=None,
                config=None, state_dir=None, log_level="info")
    base.update(kw)
    return argparse.Namespace(**base)


def test_config_file_then_flags(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text('name = "from-file"\nthreads = 2\nspin = true\npeer = ["10.0.0.9:7071"]\nmemory-budget = "2GiB"\n'
                   "[runtime]\nattention = \"plain\"\n[control]\nheartbeat_interval = 0.5\n[workload]\narrival_rate = 3.0\n")
    key = tmp_path / "k"
    key.write_text("a-long-enough-mesh-key\n")
    o = build_options(_args(model=str(tiny_model_dir), config=str(cfg), threads=3, port=0,
                            state_dir=str(tmp_path / "s"), mesh_key_file=str(key)))
    assert (o.name, o.threads, o.memory_budget, o.peers) == ("from-file", 3, 2 << 30, (("10.0.0.9", 7071),))
    assert o.spin  # the device runs this node alone: onnxruntime's threads may wait busy
    assert o.attention == "plain"
    assert o.control.heartbeat_interval == 0.5 and o.workload.arrival_rate == 3.0
    assert o.mesh_key == b"a-long-enough-mesh-key"
    # No --host or --interface: listen on all addresses, announce the default route's.
    assert o.host == "0.0.0.0" and o.advertise_host == primary_ipv4()
    o = build_options(_args(model=str(tiny_model_dir), host="127.0.0.1", state_dir=str(tmp_path / "s")))
    assert o.host == o.advertise_host == "127.0.0.1" and o.interfaces == ("127.0.0.1",)
    assert o.attention == "auto"
    o = build_options(_args(model=str(tiny_model_dir), interface=["lo"], state_dir=str(tmp_path / "s")))
    assert o.host == o.advertise_host == "127.0.0.1" and o.interfaces == ("127.0.0.1",)
    cfg.write_text("colour = 'blue'\n")
    with pytest.raises(UserError, match=r"n\.toml: unknown key 'colour'"):
        build_options(_args(model=str(tiny_model_dir), config=str(cfg)))


def test_bad_node_options_are_one_line_errors(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    base = ["node", "--model", str(tiny_model_dir), "--state-dir", str(tmp_path)]
    for extra, msg in ((["--slowdown", "0.5"], "--slowdown 0.5: must be >= 1"),
                       (["--threads", "0"], "--threads 0: must be >= 1"),
                       (["--memory-budget", "lots"], "--memory-budget"),
                       (["--strategy", "guesswork"], "known strategies are"),
                       (["--interface", "nope0"], "no network interface"),
                       (["--mesh-key-file", str(tmp_path / "missing")], "cannot read --mesh-key-file")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err


def test_node_id_is_stable_across_restarts(tmp_path: Path) -> None:
    a = stable_node_id(tmp_path / "st")
    assert a == stable_node_id(tmp_path / "st") and len(a) == 16
    assert stable_node_id(tmp_path / "other") != a


def test_status_of_an_unreachable_node_is_a_clear_error(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["status", "--node", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and "meshllm node" in err and "Traceback" not in err


def test_status_table_shows_members_leader_and_plan() -> None:
    view = {
        "node": {"id": "aaaa1111", "name": "a", "addr": "10.0.0.1:7070", "model_id": "m" * 64, "mesh_id": "x" * 16},
        "term": 4, "leader": "bbbb2222", "epoch": 7, "ready": True,
        "members": [
            {"id": "aaaa1111", "name": "a", "addr": "10.0.0.1:7070", "state": "alive", "loaded": [0, 3],
             "profile": {"threads": 1, "slowdown": 1.0, "memory_bytes": 1 << 30, "decode_s_per_token": 0.002}},
            {"id": "bbbb2222", "name": "b", "addr": "10.0.0.2:7070", "state": "suspect", "loaded": [3, 5],
             "profile": None}],
        "plan": {"epoch": 7, "strategy": "e2llm-ga", "predicted": {"throughput_tps": 12.5, "overloaded": False},
                 "replicas": [{"id": 0, "role": "both", "stages": [{"node": "aaaa1111", "layers": [0, 3]},
                                                                  {"node": "bbbb2222", "layers": [3, 5]}]}]},
    }
    out = format_table(view)
    assert "term 4  leader b  epoch 7  READY" in out
    assert "suspect" in out and "leader" in out and "[0,3)" in out and "2.00" in out
    assert "replica 0 BOTH     a [0,3) -> b [3,5)" in out and "throughput_tps=12.5" in out
