"""``meshllm plan`` and ``meshllm bench planner`` end to end (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshllm.cli import main
from meshllm.commands.plan import length_spec, workload_from
from meshllm.errors import ConfigError
from meshllm.planner.cost import ModelProfile
from meshllm.planner.testbed import load_testbed
from meshllm.planner.types import LengthDist, Plan, Workload
from meshllm.planner.validate import validate_plan

ROOT = Path(__file__).resolve().parents[1]
HOME = str(ROOT / "tools/testbeds/home.toml")


def test_plan_table(capsys):
    assert main(["plan", "--testbed", HOME, "--model", "llama2-7b", "--strategy", "edgeshard-latency"]) == 0
    out = capsys.readouterr().out
    assert "strategy edgeshard-latency" in out and "macbook-air" in out and "ms/token" in out


def test_plan_json_carries_the_cost_tables(capsys):
    assert main(["plan", "--testbed", HOME, "--model", "llama2-7b", "--strategy", "e2llm", "--json",
                 "--workload", "rate=0.5,input=uniform:16:512,output=64,batch=4", "--seed", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    plan = Plan.from_dict(doc["plan"])
    tb = load_testbed(HOME)
    validate_plan(plan, ModelProfile.from_preset("llama2-7b"), tb.devices)
    inputs = doc["inputs"]
    assert inputs["workload"]["arrival_rate"] == 0.5 and inputs["workload"]["max_batch"] == 4
    assert set(inputs["devices"]) == {d.name for d in tb.devices}
    assert len(inputs["devices"]["rtx4090"]["prefill_ms_per_token"]) == 34
    assert "rtx4090" in inputs["activation_ms_per_token"]["mini-pc"]


def test_does_not_fit_is_a_clear_answer(capsys):
    rc = main(["plan", "--testbed", HOME, "--model", "llama2-13b", "--strategy", "edge-solo"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not fit" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_inputs_exit_2(capsys, tmp_path):
    assert main(["plan", "--testbed", HOME, "--model", "nope", "--strategy", "ring"]) == 2
    assert main(["plan", "--testbed", HOME, "--model", "tiny", "--workload", "rate=fast"]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[[device]]\nname = 'x'\n")
    assert main(["plan", "--testbed", str(bad), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_length_and_workload_specs():
    assert length_spec("32") == LengthDist.fixed(32)
    assert length_spec("uniform:4:9") == LengthDist.uniform(4, 9)
    assert length_spec("lognormal:100:0.5:800") == LengthDist.lognormal(100, 0.5, 800)
    assert length_spec("empirical:1/2/3") == LengthDist.empirical([1, 2, 3])
    with pytest.raises(ConfigError):
        length_spec("gamma:1:2")
    w = workload_from(Workload(1.0), "rate=3,batch=2")
    assert w.arrival_rate == 3 and w.max_batch == 2 and w.input_len == LengthDist.fixed(32)
    with pytest.raises(ConfigError):
        workload_from(None, "speed=3")


def test_plan_with_pinned_roles(capsys):
    assert main(["plan", "--testbed", HOME, "--model", "llama2-7b", "--strategy", "e2llm:both,both"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split()[1] for ln in out.splitlines() if ln.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    assert rows == ["both", "both"], out
    assert "strategy e2llm:both,both" in out and "replicas pinned by the operator" in out


def test_a_node_refuses_a_bad_pinned_strategy_in_one_line():
    import argparse

    from meshllm.settings import add_arguments, resolve

    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(ConfigError) as e:
        resolve(p.parse_args(["--strategy", "e2llm:prefill"]), {})
    assert str(e.value) == ("--strategy e2llm:prefill: strategy 'e2llm:prefill': a PREFILL replica needs a "
                            "DECODER replica and the other way round")
    assert resolve(p.parse_args(["--strategy", "e2llm:prefill,decoder"]), {})["strategy"] == "e2llm:prefill,decoder"


def test_workloads_beyond_the_context_are_one_line_errors(capsys):
    assert main(["plan", "--testbed", HOME, "--model", "llama2-7b", "--workload", "input=5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshllm plan: error: workload: a prompt of 5000 tokens") and "\n" not in err
    assert "context of 4096 tokens" in err
    assert main(["plan", "--testbed", HOME, "--model", "llama2-7b", "--workload", "output=1,input=1,rate=1e-9,batch=1"]) == 0
    assert "mean wait          0.000 s" in capsys.readouterr().out
