"""Network-namespace lab (root only): ``meshllm node`` processes in separate namespaces on one
bridge find each other by real mDNS across veth links and agree on a leader and a plan."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("netlab", ROOT / "tools" / "netlab.py")
assert _spec is not None and _spec.loader is not None
netlab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netlab)

_WHY = netlab.why_unavailable()
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]

CONFIG = """
[control]
heartbeat_interval = 0.3
suspect_after = 3
dead_after = 8
election_timeout = 1.0
election_backoff = 0.3
discovery_grace = 1.0
replan_debounce = 0.5
island_deadline = 3.0
island_generations = 5
"""


def view(addr: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{addr}:7070/v1/mesh", timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def test_nodes_in_namespaces_find_each_other_by_mdns(tmp_path: Path, tiny_model_dir: Path) -> None:
    key = tmp_path / "mesh.key"
    key.write_text(uuid.uuid4().hex)
    cfg = tmp_path / "node.toml"
    cfg.write_text(CONFIG)
    prefix = f"mt{os.getpid() % 10000}"
    with netlab.Lab(prefix, 3, net=90 + os.getpid() % 60, rate_mbit=100) as lab:
        addrs = [lab.addr(i) for i in range(3)]
        for i, a in enumerate(addrs):
            with open(tmp_path / f"n{i}.log", "wb") as log:
                lab.popen(i, [sys.executable, "-m", "meshllm.cli", "node", "--model", str(tiny_model_dir),
                              "--name", f"n{i}", "--host", a, "--interface", a, "--port", "7070",
                              "--state-dir", str(tmp_path / f"n{i}"), "--mesh-key-file", str(key),
                              "--threads", "1", "--config", str(cfg)],
                          stdout=log, stderr=log, cwd=ROOT)
        def logs() -> str:
            return "".join(f"--- n{i} ---\n" + (tmp_path / f"n{i}.log").read_text()[-3000:] for i in range(3))

        def nodes_alive() -> None:
            if any(p.poll() is not None for p in lab.procs):
                raise AssertionError("a node exited:\n" + logs())

        def agreement() -> list[dict] | None:
            vs = [view(a) for a in addrs]
            if all(v and v["ready"] and sum(m["state"] == "alive" for m in v["members"]) == 3 for v in vs) \
                    and len({(v["term"], v["leader"], v["epoch"]) for v in vs}) == 1:
                return vs  # type: ignore[return-value]
            return None

        agreed = wait_until(agreement, "the namespaced nodes to agree", 90, check=nodes_alive, describe=logs)
        # Each node reached the others at their namespace addresses (found by mDNS, not seeds).
        for v in agreed:
            others = {m["addr"] for m in v["members"] if not m["self"]}
            assert others == {f"{a}:7070" for a in addrs} - {v["node"]["addr"]}
        # The links are shaped to 100 Mb/s by tbf, and the nodes' own probes see it (loopback
        # without shaping measures thousands of Mb/s here).
        def measured() -> list | None:
            found = [m["link"] for a in addrs for m in (view(a) or {}).get("members", []) if not m["self"]]
            return found if len(found) == 6 and all(found) else None

        links = wait_until(measured, "every node to measure its links to the other two", 30)
        print("measured links:", links)
        # (400: room for timing noise; unshaped, these veths measure from several hundred to thousands.)
        assert len(links) == 6 and all(ln and 1 < ln["mbps"] < 400 for ln in links), links

        # The mesh serves across the namespaces (activations and KV over the shaped veths): the
        # answer at every node equals one process's.
        from meshllm.model.manifest import load_manifest
        from meshllm.runtime.generate import generate
        from meshllm.runtime.runner import StageRunner
        from meshllm.runtime.sampling import SamplingParams

        m = load_manifest(tiny_model_dir)
        prompt = [5, 17, 33, 8, 61]
        want = list(generate(StageRunner(m, 0, m.config.num_blocks, threads=1), prompt,
                             SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)).token_ids)
        for a in addrs:
            body = json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(f"http://{a}:7070/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                doc = json.loads(r.read())
            assert doc["meshllm"]["token_ids"] == want, a


SLOW_PAIR = """
[[device]]
name = "fast"
memory_gb = 8
tflops = 1.0
mem_bw_gbs = 60
source = true

[[device]]
name = "slow"
memory_gb = 8
tflops = 0.5
mem_bw_gbs = 30

[network]
default_mbps = 12
"""


def test_serving_experiment_in_namespaces(tmp_path: Path, tiny_model_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``netlab.py serve --quick``: bench serving's experiment on two namespaced nodes made from a
    testbed (slowdowns from memory bandwidth, the pair's link limited by htb), the simulator on the
    plan, profiles and links the nodes measured."""
    tb = tmp_path / "pair.toml"
    tb.write_text(SLOW_PAIR)
    assert netlab.main(["serve", "--quick", "--model", str(tiny_model_dir), "--strategies", "splitwise",
                        "--testbed", str(tb), "--prefix", f"ms{os.getpid() % 10000}",
                        "--net", str(150 + os.getpid() % 60), "--json", "--record", str(tmp_path / "run.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == "netns" and out["devices"] == ["fast", "slow"] and out["slowdowns"] == [1.0, 2.0]
    assert out["link_mbps"] == {"fast-slow": 12.0}
    assert [c["load"] for c in out["cells"]] == [0.0, 0.5]
    mix = out["cells"][0]["mix"]
    assert sorted(r["role"] for r in out["plans"][mix]["splitwise"]) == ["decoder", "prefill"]
    # the simulator got the shaped link as the nodes measured it (unshaped, a veth measures
    # hundreds of Mb/s or more)
    (measured_link,) = out["links_mbps"][mix]["splitwise"].values()
    assert 1 < measured_link < 100, measured_link
    c = out["cells"][1]
    assert c["strategy"] == "splitwise" and c["rate_rps"] > 0
    for side in ("measured", "predicted", "predicted_shared_cores"):
        assert c[side]["completed"] == 4 and c[side]["errors"] == 0 and c[side]["rejected"] == 0
        assert 0 < c[side]["ttft_ms"] <= c[side]["ttft_p99_ms"] < 60_000
        assert 0 < c[side]["tpot_ms"] < 60_000 and c[side]["wait_ms"] >= 0
    assert set(c["error_pct"]) == {"ttft_ms", "tpot_ms", "wait_ms"}
    assert out["judged"]["cells"] == 2
    # the recorded run predicts the same again without a mesh (--replay: the simulator on the
    # run's plans, profiles, links and trace)
    assert netlab.main(["serve", "--replay", str(tmp_path / "run.json"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [(c["predicted"], c["measured"]) for c in again["cells"]] == [(c["predicted"], c["measured"])
                                                                         for c in out["cells"]]
    # the lab is gone
    assert f"ms{os.getpid() % 10000}ns0" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                text=True).stdout
