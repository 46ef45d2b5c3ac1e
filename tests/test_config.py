"""One table of node options: flags over environment over file over defaults, each value's source
recorded, bad values named where they were written, `meshllm config show`, and the documented
table equal to the code's."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pytest

from meshllm.cli import build_parser, main
from meshllm.commands.node import build_options
from meshllm.control.config import ControlConfig
from meshllm.errors import ConfigError
from meshllm.planner.types import Workload
from meshllm.serve.config import ServeConfig
from meshllm.settings import (
    BY_KEY,
    CONTROL_HELP,
    OPTIONS,
    SERVE_HELP,
    add_arguments,
    doc_block,
    markdown_table,
    resolve,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_win_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('port = 7100\nthreads = 2\nname = "from-file"\nmax_queue = 5\n'
                   "[serve]\nkeepalive_s = 4.0\n[control]\nheartbeat_interval = 0.5\n")
    env = {"MESHLLM_PORT": "7200", "MESHLLM_THREADS": "3", "MESHLLM_SERVE_KEEPALIVE_S": "2.5",
           "MESHLLM_UNRELATED": "ignored"}
    c = resolve(flags("--config", str(cfg), "--port", "7300", "--max-queue", "9"), env)
    assert (c["port"], c.sources["port"]) == (7300, "flag --port")
    assert (c["threads"], c.sources["threads"]) == (3, "env MESHLLM_THREADS")
    assert (c["name"], c.sources["name"]) == ("from-file", f"file {cfg}")
    assert (c["slowdown"], c.sources["slowdown"]) == (1.0, "default")
    assert (c["serve.max_queue"], c.sources["serve.max_queue"]) == (9, "flag --max-queue")
    assert (c["serve.keepalive_s"], c.sources["serve.keepalive_s"]) == (2.5, "env MESHLLM_SERVE_KEEPALIVE_S")
    assert (c["control.heartbeat_interval"], c.sources["control.heartbeat_interval"]) == (0.5, f"file {cfg}")
    # without the flag, the env; without the env, the file (the old top-level max_queue key too)
    c = resolve(flags("--config", str(cfg)), {})
    assert (c["port"], c["threads"], c["serve.max_queue"], c["serve.keepalive_s"]) == (7100, 2, 5, 4.0)
    # the config file may come from the environment
    c = resolve(flags(), {"MESHLLM_CONFIG": str(cfg)})
    assert c["port"] == 7100 and c.config_file == str(cfg)
    # nothing given: the defaults, which are the dataclasses' own
    c = resolve(flags(), {})
    assert set(c.sources.values()) == {"default"}
    assert ServeConfig(**c.table("serve")) == ServeConfig()
    assert ControlConfig(**c.table("control")) == ControlConfig()
    assert Workload.from_dict(c.table("workload")) == Workload()


def test_values_of_every_kind_from_the_environment(tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "k"
    key.write_text("a-long-enough-mesh-key\n")
    for name, value in {"MESHLLM_MODEL": str(tiny_model_dir), "MESHLLM_PEER": "10.0.0.2:7070, 10.0.0.3:7071",
                        "MESHLLM_NO_MDNS": "yes", "MESHLLM_MEMORY_BUDGET": "64MiB", "MESHLLM_SLOWDOWN": "2",
                        "MESHLLM_MESH_KEY_FILE": str(key), "MESHLLM_STATE_DIR": str(tmp_path / "s"),
                        "MESHLLM_HOST": "127.0.0.1", "MESHLLM_SERVE_MAX_QUEUE": "7",
                        "MESHLLM_SERVE_KV_WIRE_DTYPE": "float16", "MESHLLM_CONTROL_DEAD_AFTER": "9",
                        "MESHLLM_WORKLOAD_INPUT_LEN": '{"kind": "uniform", "low": 8, "high": 64}',
                        "MESHLLM_WORKLOAD_OUTPUT_LEN": "40", "MESHLLM_ISLANDS": "2"}.items():
        monkeypatch.setenv(name, value)
    o = build_options(flags())
    assert o.peers == (("10.0.0.2", 7070), ("10.0.0.3", 7071)) and o.mdns is False
    assert (o.memory_budget, o.slowdown, o.islands, o.host) == (64 << 20, 2.0, 2, "127.0.0.1")
    assert o.mesh_key == b"a-long-enough-mesh-key" and o.state_dir == tmp_path / "s"
    assert (o.serve.max_queue, o.serve.kv_wire_dtype, o.control.dead_after) == (7, "float16", 9)
    assert (o.workload.input_len.low, o.workload.input_len.high, o.workload.output_len.value) == (8, 64, 40)


@pytest.mark.parametrize(("argv", "env", "file", "message"), [
    ((), {"MESHLLM_PORT": "abc"}, None, "MESHLLM_PORT=abc: not an integer"),
    ((), {"MESHLLM_PORT": "70000"}, None, "MESHLLM_PORT=70000: not a port (0..65535)"),
    ((), {"MESHLLM_NO_MDNS": "maybe"}, None, "MESHLLM_NO_MDNS=maybe: not a boolean (use true or false)"),
    ((), {"MESHLLM_SERVE_MAX_QUEUE": "many"}, None, "MESHLLM_SERVE_MAX_QUEUE=many: not an integer"),
    ((), {"MESHLLM_LOG_FORMAT": "xml"}, None, "MESHLLM_LOG_FORMAT=xml: choose one of text, json"),
    ((), {"MESHLLM_PEER": "nohost"}, None, "MESHLLM_PEER=nohost: 'nohost' is not HOST:PORT"),
    ((), {"MESHLLM_WORKLOAD_INPUT_LEN": "{"}, None, "MESHLLM_WORKLOAD_INPUT_LEN={: not a token count"),
    ((), {}, "[serve]\nfoo = 1\n", "node.toml: [serve] unknown key 'foo'"),
    ((), {}, "colour = 'blue'\n", "node.toml: unknown key 'colour'"),
    ((), {}, "therads = 2\n", "node.toml: unknown key 'therads' (did you mean 'threads'?)"),
    ((), {}, "serve = 3\n", "node.toml: [serve] must be a table"),
    ((), {}, "port = 'x'\n", 'node.toml: port = "x": not an integer'),
    ((), {}, "[control]\nheartbeat_interval = 'soon'\n", 'node.toml: [control] heartbeat_interval = "soon": not a number'),
    ((), {}, "memory_budget = 'lots'\n", "node.toml: memory_budget = \"lots\": not a positive size"),
    ((), {}, "port = [\n", "node.toml: "),  # not TOML
    (("--threads", "0"), {}, None, "--threads 0: must be >= 1"),
    (("--slowdown", "fast"), {}, None, "--slowdown fast: not a number"),
    (("--strategy", "guesswork"), {}, None, "--strategy guesswork: known strategies are"),
    (("--peer", "a:1", "--peer", "b"), {}, None, "--peer a:1 --peer b: 'b' is not HOST:PORT"),
])
def test_bad_values_name_their_source(tmp_path: Path, argv: tuple[str, ...], env: dict[str, str], file: str | None,
                                      message: str) -> None:
    extra: tuple[str, ...] = ()
    if file is not None:
        (tmp_path / "node.toml").write_text(file)
        extra = ("--config", str(tmp_path / "node.toml"))
    with pytest.raises(ConfigError) as e:
        resolve(flags(*argv, *extra), env)
    got = str(e.value).replace(str(tmp_path) + "/", "")
    assert got.startswith(message), got
    assert "\n" not in got


def test_a_table_the_dataclass_rejects_names_the_sources(tmp_path: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[control]\nsuspect_after = 5\n")
    monkeypatch.setenv("MESHLLM_CONTROL_DEAD_AFTER", "3")
    with pytest.raises(ConfigError, match=r"\[control\] \(env MESHLLM_CONTROL_DEAD_AFTER, file .*node.toml\): "
                                          r"invalid control config: need 1 <= suspect_after < dead_after"):
        build_options(flags("--model", str(tiny_model_dir), "--config", str(cfg)))


def test_config_show_prints_values_and_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('name = "kitchen"\n[serve]\nmax_queue = 9\n')
    monkeypatch.setenv("MESHLLM_THREADS", "4")
    assert main(["config", "show", "--config", str(cfg), "--port", "7200", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    opts = doc["options"]
    assert doc["config_file"] == str(cfg) and set(opts) == set(BY_KEY)
    assert opts["port"] == {"value": 7200, "source": "flag --port", "env": "MESHLLM_PORT"}
    assert opts["threads"] == {"value": 4, "source": "env MESHLLM_THREADS", "env": "MESHLLM_THREADS"}
    assert opts["name"]["source"] == f"file {cfg}" and opts["serve.max_queue"]["value"] == 9
    assert opts["log_format"] == {"value": "text", "source": "default", "env": "MESHLLM_LOG_FORMAT"}

    assert main(["config", "show", "--config", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"config file: {cfg} (flag --config)"
    row = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert row["threads"][1:] == ["4", "env", "MESHLLM_THREADS"]
    assert row["serve.max_queue"][1:] == ["9", "file", str(cfg)]
    assert row["port"][1:] == ["7070", "default"]

    monkeypatch.setenv("MESHLLM_PORT", "abc")
    assert main(["config", "show"]) == 2
    assert capsys.readouterr().err.strip() == "meshllm config: error: MESHLLM_PORT=abc: not an integer"


def test_every_table_field_has_an_option_with_help() -> None:
    for table, cls, help_ in (("serve", ServeConfig, SERVE_HELP), ("control", ControlConfig, CONTROL_HELP)):
        names = [f.name for f in fields(cls)]
        assert sorted(names) == sorted(help_), table
        assert all(f"{table}.{n}" in BY_KEY and BY_KEY[f"{table}.{n}"].help for n in names)
    assert {f.name for f in fields(Workload)} == {k.split(".")[1] for k in BY_KEY if k.startswith("workload.")}
    from meshllm.node import DEFAULT_PORT

    assert BY_KEY["port"].default == DEFAULT_PORT
    from meshllm.runtime.attention import AUTO, SETTINGS

    assert BY_KEY["runtime.attention"].choices == SETTINGS and BY_KEY["runtime.attention"].default == AUTO
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)
    # every option with a flag is on `meshllm node`, with the same attribute
    node = build_parser()._subparsers._group_actions[0].choices["node"]  # type: ignore[union-attr]
    dests = {a.dest for a in node._actions}
    assert {o.dest for o in OPTIONS if o.flag} <= dests and "log_format" in dests


def test_the_documented_table_is_the_codes() -> None:
    assert doc_block(DOC.read_text()) == markdown_table(), (
        "docs/configuration.md is stale: run `meshllm config table --write docs/configuration.md`")
    for o in OPTIONS:
        assert f"`{o.env}`" in markdown_table()
