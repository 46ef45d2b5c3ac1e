#!/usr/bin/env python3
"""Network-namespace lab: a LAN of meshllm nodes on one Linux machine (root only).

Each node gets its own network namespace with a veth pair plugged into one bridge, an address
10.<net>.0.<i+1>/24, and optionally a ``tc tbf`` rate limit on its side of the link (there is no
``netem`` here; add delay in the application's test link layer if a test needs it). mDNS floods
across the bridge (multicast snooping off), so nodes find each other as on a real LAN. The bridge
gets 10.<net>.0.254 so the host can reach every node's HTTP API.

    sudo tools/netlab.py up --nodes 3 [--rate-mbit 50] [--prefix mlab]
    sudo tools/netlab.py exec 0 -- .venv/bin/meshllm node --host 10.77.0.1 --interface 10.77.0.1
    sudo tools/netlab.py down [--prefix mlab]
    sudo tools/netlab.py serve [--testbed tools/testbeds/lan.toml] [--nodes 4] [bench serving's options] [--json]
    sudo tools/netlab.py serve-bench [--nodes 3] [--rate-mbit 50] [--slowdowns 1,2,4] [--json]
    sudo tools/netlab.py chaos [--nodes 5] [--requests 60] [--rate 50] [--faults kill-decoder,...] [--json]

``serve`` is ``meshllm bench serving``'s experiment (the same trace, strategies, simulator and JSON,
``meshllm.bench.serving.experiment``) on a lab mesh: the testbed's first ``--nodes`` devices, each
node slowed by the fastest device's memory bandwidth over its own, each pair's link limited to the
testbed's rate (``htb``, a class per peer). ``serve-bench`` runs the same requests through a mesh in the lab under two placements, the
planner's DP (``edgeshard-latency``) and an even split (``edgeshard-even``), and prints, for each,
the measured time per token beside the plan's predicted figure. ``chaos`` drives greedy streamed
requests through a lab mesh while it kills a decoder stage, a prefill stage and the leader (kill -9),
takes a link down and up, and adds a node, and prints one JSON object: requests sent, completed
with the expected tokens, completed with other tokens, failed with an explicit error, lost (no answer
and no error), migrations, the time to serve again after each fault and to a new leader after
each leader kill, and node RSS before and after. Everything it made is removed, also on Ctrl-C.

Also importable (``Lab``) by tests: ``with Lab("mlt", 3) as lab: lab.popen(0, argv)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

TESTBEDS = Path(__file__).resolve().parent / "testbeds"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def why_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason (for a test skip)."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth, bridge)"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"mlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Lab:
    def __init__(self, prefix: str, nodes: int, *, net: int = 77, rate_mbit: float | None = None,
                 pair_mbit: dict[tuple[int, int], float] | None = None) -> None:
        """``rate_mbit``: a ``tbf`` rate on every node's side of its link; ``pair_mbit``: instead,
        a rate per pair of nodes (``htb``, a class per peer chosen by destination address, so
        node i sends to node j at ``pair_mbit[(i, j)]`` or ``pair_mbit[(j, i)]``; unlisted
        pairs and the host are not limited)."""
        if len(prefix) > 6:
            raise ValueError("prefix must be at most 6 characters (interface names are limited to 15)")
        if rate_mbit and pair_mbit:
            raise ValueError("give rate_mbit or pair_mbit, not both")
        self.prefix, self.n, self.net, self.rate = prefix, nodes, net, rate_mbit
        self.pairs = {frozenset(k): v for k, v in (pair_mbit or {}).items()}
        self.bridge = f"{prefix}br"
        self.procs: list[subprocess.Popen[bytes]] = []

    def ns(self, i: int) -> str:
        return f"{self.prefix}ns{i}"

    def addr(self, i: int) -> str:
        return f"10.{self.net}.0.{i + 1}"

    @property
    def host_addr(self) -> str:
        return f"10.{self.net}.0.254"

    def up(self) -> Lab:
        self.down()
        try:
            _ip("link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
            _ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, host_end, ns_end = self.ns(i), f"{self.prefix}h{i}", f"{self.prefix}n{i}"
                subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
                _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
                _ip("link", "set", ns_end, "netns", ns)
                _ip("link", "set", host_end, "master", self.bridge)
                _ip("link", "set", host_end, "up")
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("addr", "add", f"{self.addr(i)}/24", "dev", ns_end, ns=ns)
                _ip("link", "set", ns_end, "up", ns=ns)
                # Multicast needs a route out of the namespace; the bridge is the whole world.
                _ip("route", "add", "224.0.0.0/4", "dev", ns_end, ns=ns)
                if self.rate:
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_end, "root",
                                    "tbf", "rate", f"{self.rate}mbit", "burst", "32kbit", "latency", "400ms"],
                                   check=True, capture_output=True, text=True)
                elif self.pairs:
                    self._shape_pairs(i, ns, ns_end)
        except subprocess.CalledProcessError as e:
            self.down()
            raise RuntimeError(f"netlab: {' '.join(e.cmd)} failed: {(e.stderr or '').strip()}") from None
        return self

    def _shape_pairs(self, i: int, ns: str, dev: str) -> None:
        def tc(*args: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True, text=True)

        tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit")
        for j in range(self.n):
            mbit = self.pairs.get(frozenset((i, j)))
            if j == i or mbit is None:
                continue
            cls = f"1:{j + 16:x}"
            tc("class", "add", "dev", dev, "parent", "1:", "classid", cls, "htb", "rate", f"{mbit}mbit",
               "ceil", f"{mbit}mbit")
            tc("filter", "add", "dev", dev, "protocol", "ip", "parent", "1:", "prio", "1", "u32", "match", "ip",
               "dst", f"{self.addr(j)}/32", "flowid", cls)

    def popen(self, i: int, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()
        for i in range(max(self.n, 1) + 8):  # also leftovers of a larger lab with this prefix
            subprocess.run(["ip", "netns", "del", self.ns(i)], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self.prefix}h{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _view(addr: str) -> dict | None:
    from meshllm.client import get_json

    return get_json(f"http://{addr}:7070/v1/mesh")


def _timed_request(addr: str, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per token after it) of one greedy streamed request."""
    import time

    from meshllm.client import ask, sse_events

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    times = []
    with ask(f"http://{addr}:7070", body, chat=False, stream=True, timeout=600) as r:
        for ev in sse_events(r):
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            times.append(time.perf_counter())
    return times[0] - t0, (times[-1] - times[0]) / max(len(times) - 1, 1)


def serve_bench(nodes: int, rate: float, slowdowns: list[float], model: str | None, prefix: str,
                net: int, timeout: float = 180.0) -> dict:
    """The DP placement vs an even split in the lab: measured and predicted ms per token."""
    import json
    import tempfile
    import time
    import uuid
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out: dict = {"nodes": nodes, "rate_mbit": rate, "slowdowns": slowdowns}
    for strategy in ("edgeshard-latency", "edgeshard-even"):
        with tempfile.TemporaryDirectory(prefix="netlab-") as tmp, Lab(prefix, nodes, net=net, rate_mbit=rate) as lab:
            key = Path(tmp) / "key"
            key.write_text(uuid.uuid4().hex)
            addrs = [lab.addr(i) for i in range(nodes)]
            # each node's profile measured here, one at a time: measuring at once on one machine
            # they would share its cores and memory bandwidth (on real devices each measures alone)
            from meshllm.commands.up import premeasure_states

            premeasure_states(model, [Path(f"{tmp}/n{i}") for i in range(nodes)],
                              [slowdowns[min(i, len(slowdowns) - 1)] for i in range(nodes)], 1)
            for i, a in enumerate(addrs):
                argv = [sys.executable, "-m", "meshllm.cli", "node", "--name", f"n{i}", "--host", a,
                        "--interface", a, "--port", "7070", "--state-dir", f"{tmp}/n{i}", "--mesh-key-file",
                        str(key), "--threads", "1", "--slowdown", str(slowdowns[min(i, len(slowdowns) - 1)]),
                        "--strategy", strategy, "--objective", "latency"]
                if model:
                    argv += ["--model", model]
                with open(f"{tmp}/n{i}.log", "wb") as log:
                    lab.popen(i, argv, stdout=log, stderr=log, cwd=root)
            deadline = time.monotonic() + timeout
            view = None
            while time.monotonic() < deadline:
                vs = [_view(a) for a in addrs]
                if all(v and v.get("ready") and sum(m["state"] == "alive" for m in v["members"]) == nodes
                       and all(m.get("link") for m in v["members"] if not m["self"]) for v in vs):
                    view = vs[0]
                    break
                time.sleep(0.5)
            if view is None:
                raise RuntimeError(f"{strategy}: the lab mesh was not ready within {timeout:.0f} s")
            plan = view["plan"]
            wl = plan.get("workload") or {}
            n_in, n_out = round(wl.get("mean_input_len") or 32), round(wl.get("mean_output_len") or 96)
            prompt = [3 + (7 * i) % 90 for i in range(n_in)]
            _timed_request(addrs[0], prompt[:4], 4)  # warm every stage
            runs = [_timed_request(addrs[0], prompt, n_out) for _ in range(3)]
            ttft = sorted(r[0] for r in runs)[1]
            tpot = sorted(r[1] for r in runs)[1]
            measured = (ttft + tpot * (n_out - 1)) / n_out * 1000
            predicted = (plan.get("predicted") or {}).get("latency_ms_per_token")
            out[strategy] = {
                "plan": [[(s["node"][:6], s["layers"]) for s in r["stages"]] for r in plan["replicas"]],
                "measured_ms_per_token": round(measured, 3), "predicted_ms_per_token": predicted,
                "ttft_ms": round(ttft * 1000, 2), "tpot_ms": round(tpot * 1000, 3),
                "error_vs_predicted": None if not predicted else round(abs(measured - predicted) / predicted, 3)}
    dp, even = out["edgeshard-latency"], out["edgeshard-even"]
    out["dp_speedup_vs_even"] = round(even["measured_ms_per_token"] / dp["measured_ms_per_token"], 3)
    print(json.dumps(out))
    return out


def testbed_lab(path: str, nodes: int) -> tuple[list[str], list[float], dict[tuple[int, int], float]]:
    """The first ``nodes`` devices of a testbed file as a lab: (names, slowdowns, per-pair Mb/s).
    Node i computes max(mem_bw_gbs) / mem_bw_gbs(i) times slower than this machine (decoding on a
    CPU is bound by memory bandwidth; the fastest device is this machine); every pair's link is
    the testbed's rate for it (its default where it lists none). Round-trip times are left out:
    there is no ``netem`` to add delay."""
    from meshllm.errors import UserError
    from meshllm.planner.testbed import load_testbed
    from meshllm.planner.types import MBIT

    tb = load_testbed(path)
    if not 1 <= nodes <= len(tb.devices):
        raise UserError(f"{path} has {len(tb.devices)} devices; asked for {nodes}")
    devs = tb.devices[:nodes]
    fastest = max(d.mem_bw_gbs for d in devs)
    slowdowns = [round(fastest / d.mem_bw_gbs, 3) for d in devs]
    pairs = {(i, j): tb.network.bandwidth(a.name, b.name) / MBIT
             for i, a in enumerate(devs) for j, b in enumerate(devs) if i < j}
    return [d.name for d in devs], slowdowns, pairs


class NetMesh:
    """A strategy's mesh in the lab, for the serving experiment (``meshllm.bench.serving.Shell``):
    node i in namespace i at ``10.<net>.0.<i+1>:7070``, its slowdown and its per-pair link rates
    from the testbed. Each mesh makes its own lab and removes it when it stops."""

    def __init__(self, prefix: str, net: int, names: Sequence[str], slowdowns: Sequence[float],
                 pairs: dict[tuple[int, int], float], model: str, strategy: str, threads: int = 1) -> None:
        import tempfile

        self.n = len(names)
        self.names, self.slowdowns, self.model, self.strategy, self.threads = (
            list(names), list(slowdowns), model, strategy, threads)
        self.lab = Lab(prefix, self.n, net=net, pair_mbit=pairs)
        self._tmp = tempfile.TemporaryDirectory(prefix="netlab-serve-")
        self.dir = Path(self._tmp.name)

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.lab.addr(i)}:7070" for i in range(self.n)]

    def state_dir(self, i: int) -> Path:
        return self.dir / f"state-{i}"

    def premeasure(self) -> None:
        from meshllm.commands.up import premeasure_states

        premeasure_states(self.model, [self.state_dir(i) for i in range(self.n)], self.slowdowns, self.threads)

    def __enter__(self) -> NetMesh:
        import uuid

        key = self.dir / "mesh.key"
        key.write_text(uuid.uuid4().hex)
        self.lab.up()
        try:
            for i in range(self.n):
                a = self.lab.addr(i)
                argv = [sys.executable, "-m", "meshllm.cli", "node", "--name", self.names[i], "--host", a,
                        "--interface", a, "--port", "7070", "--state-dir", str(self.state_dir(i)),
                        "--mesh-key-file", str(key), "--threads", str(self.threads), "--slowdown",
                        str(self.slowdowns[i]), "--strategy", self.strategy, "--model", self.model]
                argv += [x for j in range(self.n) if j != i for x in ("--peer", f"{self.lab.addr(j)}:7070")]
                with open(self.dir / f"node-{i}.log", "wb") as log:
                    self.lab.popen(i, argv, stdout=log, stderr=subprocess.STDOUT)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for p in self.lab.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.lab.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.lab.down()
        self._tmp.cleanup()

    def log_tail(self, i: int, n: int = 3000) -> str:
        try:
            return (self.dir / f"node-{i}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The node processes (``ip netns exec`` becomes the node: same pid)."""
        return [p.pid for p in self.lab.procs]

    def check_alive(self) -> None:
        from meshllm.errors import MeshError

        for i, p in enumerate(self.lab.procs):
            if p.poll() is not None:
                raise MeshError(f"{self.names[i]} exited with {p.returncode}:\n{self.log_tail(i)}")

    def wait_ready(self, timeout: float) -> dict:
        """The first node's view once every node is in it, every node has measured its links to
        the others (the simulator runs on the measured links) and all agree on an active plan."""
        import time

        from meshllm.client import get_json
        from meshllm.errors import MeshError

        deadline = time.monotonic() + timeout
        view: dict | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            views = [get_json(u + "/v1/mesh") for u in self.urls]
            view = views[0]
            if all(v and v.get("ready") and sum(m.get("state") == "alive" for m in v.get("members", [])) == self.n
                   and all(m.get("link") for m in v["members"] if not m.get("self")) for v in views) \
                    and len({v["epoch"] for v in views if v}) == 1:
                return dict(views[0])  # type: ignore[arg-type]
            time.sleep(0.25)
        why = (view or {}).get("why_not_ready") or "no answer"
        raise MeshError(f"the lab mesh was not ready within {timeout:.0f} s ({why})")


def serve(args: argparse.Namespace) -> int:
    """``meshllm bench serving``'s experiment on a lab mesh: the testbed's first ``--nodes``
    devices (slowdowns, per-pair link rates), the same trace, strategies, simulator and JSON."""
    from meshllm.bench.serving import experiment

    if args.replay:  # no mesh: the simulator on a recorded run
        return experiment(args, lambda strategy: None, {})  # type: ignore[arg-type,return-value]
    if args.quick:
        args.nodes = min(args.nodes, 2)
    if not args.dilate >= 1:
        print(f"netlab: --dilate must be at least 1, not {args.dilate}", file=sys.stderr)
        return 2
    names, slowdowns, pairs = testbed_lab(args.testbed, args.nodes)
    if args.dilate != 1:  # the same LAN, every device and link K times slower
        slowdowns = [round(s * args.dilate, 3) for s in slowdowns]
        pairs = {k: v / args.dilate for k, v in pairs.items()}

    def launch(strategy: str) -> NetMesh:
        return NetMesh(args.prefix, args.net, names, slowdowns, pairs, args.model, strategy, args.threads)

    about = {"mesh": "netns", "testbed": args.testbed, "dilate": args.dilate, "devices": names, "slowdowns": slowdowns,
             "link_mbps": {f"{names[i]}-{names[j]}": round(v, 1) for (i, j), v in sorted(pairs.items())}}
    return experiment(args, launch, about)


CHAOS_CONFIG = """
[control]
heartbeat_interval = 0.3
suspect_after = 3
dead_after = 6
election_timeout = 1.0
election_backoff = 0.3
discovery_grace = 1.0
replan_debounce = 0.5
island_deadline = 3.0
island_generations = 5
"""
FAULTS = ("kill-decoder", "kill-prefill", "kill-leader", "link-flap", "add-node")


def _stream_tokens(addr: str, prompt: list[int], tokens: int, timeout: float = 120.0) -> tuple[list[int], str | None]:
    """(token ids, error code or None) of one greedy streamed request; raises ``ConnectionError``
    (or ``MeshError`` when it cannot connect) on no answer at all."""
    from meshllm.client import ask, sse_events

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    ids: list[int] = []
    with ask(f"http://{addr}:7070", body, chat=False, stream=True, timeout=timeout) as r:
        for ev in sse_events(r):
            if "error" in ev:
                return ids, str(ev["error"].get("code"))
            ids += ev.get("meshllm", {}).get("token_ids") or []
    return ids, None


def chaos(nodes: int, requests: int, rate: float | None, faults: list[str], model: str | None, prefix: str,
          net: int, tokens: int = 24, concurrency: int = 4, timeout: float = 120.0) -> dict:
    """Requests through a lab mesh while nodes are killed, links cut and a node added."""
    import json
    import random
    import signal
    import tempfile
    import threading
    import time
    import uuid
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import numpy as np

    from meshllm.bench.mesh import rss_mb
    from meshllm.commands.up import premeasure_states
    from meshllm.errors import MeshError
    from meshllm.model.manifest import load_manifest
    from meshllm.model.paths import resolve_model_dir
    from meshllm.runtime.generate import generate
    from meshllm.runtime.runner import StageRunner
    from meshllm.runtime.sampling import SamplingParams

    root = Path(__file__).resolve().parents[1]
    manifest = load_manifest(resolve_model_dir(model), verify=False)
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(3, manifest.config.vocab_size, size=int(rng.integers(2, 24)))]
               for _ in range(8)]
    full = StageRunner(manifest, 0, manifest.config.num_blocks, threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    expected = [list(generate(full, p, params).token_ids) for p in prompts]
    del full
    out: dict = {"nodes": nodes, "requests": requests, "rate_mbit": rate, "faults": faults, "sent": 0,
                 "completed_ok": 0, "completed_different": 0, "failed_explicit": 0, "lost": 0, "migrations": 0,
                 "recovery_s": [], "election_s": [], "errors": {}}
    extra = 1 if "add-node" in faults else 0
    with tempfile.TemporaryDirectory(prefix="netlab-chaos-") as tmp, \
            Lab(prefix, nodes + extra, net=net, rate_mbit=rate) as lab:
        key = Path(tmp) / "key"
        key.write_text(uuid.uuid4().hex)
        cfg = Path(tmp) / "node.toml"
        cfg.write_text(CHAOS_CONFIG)
        addrs = [lab.addr(i) for i in range(nodes + extra)]
        procs: dict[int, object] = {}
        # profiles measured here, one at a time
        premeasure_states(model, [Path(f"{tmp}/n{i}") for i in range(nodes + extra)], [1.0] * (nodes + extra), 1)

        def start(i: int) -> None:
            argv = [sys.executable, "-m", "meshllm.cli", "node", "--name", f"n{i}", "--host", addrs[i],
                    "--interface", addrs[i], "--port", "7070", "--state-dir", f"{tmp}/n{i}", "--mesh-key-file",
                    str(key), "--threads", "1", "--config", str(cfg), "--model", str(manifest.root)]
            with open(f"{tmp}/n{i}.log", "ab") as log:
                procs[i] = lab.popen(i, argv, stdout=log, stderr=log, cwd=root)

        live = set(range(nodes))
        for i in range(nodes):
            start(i)

        def ready(at: set[int]) -> dict | None:
            views = [_view(addrs[i]) for i in sorted(at)]
            if all(v and v.get("ready") for v in views) and len({v["epoch"] for v in views}) == 1:
                return views[0]
            return None

        deadline = time.monotonic() + timeout
        while ready(live) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the chaos mesh was not ready in time")
            time.sleep(0.3)
        out["rss_mb_before"] = {f"n{i}": rss_mb(procs[i].pid) for i in live}  # type: ignore[attr-defined]
        lock = threading.Lock()
        stop = threading.Event()

        def one(k: int) -> None:
            p = k % len(prompts)
            with lock:
                out["sent"] += 1
                entry = random.choice(sorted(live))
            try:
                ids, err = _stream_tokens(addrs[entry], prompts[p], tokens)
            except MeshError as e:  # an error status (429, 503, ...), or the entry unreachable
                with lock:
                    out["failed_explicit"] += 1
                    why = "entry_killed" if entry not in live else "http_error"
                    out["errors"][why] = out["errors"].get(why, 0) + 1
                    out["errors"][str(e)[:60]] = out["errors"].get(str(e)[:60], 0) + 1
                return
            except (ConnectionError, OSError) as e:
                # the stream broke off: explicit when the entry itself was killed (the client saw
                # its connection drop), lost when the entry is alive
                with lock:
                    if entry in live:
                        out["lost"] += 1
                    else:
                        out["failed_explicit"] += 1
                        out["errors"]["entry_killed"] = out["errors"].get("entry_killed", 0) + 1
                    out["errors"][type(e).__name__] = out["errors"].get(type(e).__name__, 0) + 1
                return
            with lock:
                if err is not None:
                    out["failed_explicit"] += 1
                    out["errors"][err] = out["errors"].get(err, 0) + 1
                elif ids == expected[p]:
                    out["completed_ok"] += 1
                else:
                    out["completed_different"] += 1

        def serving_again(since: float, at: set[int]) -> float:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                i = min(at)
                try:
                    ids, err = _stream_tokens(addrs[i], prompts[0], 2, timeout=10)
                    if err is None and ids == expected[0][:2]:
                        return round(time.monotonic() - since, 3)
                except (MeshError, ConnectionError, OSError):
                    pass
                time.sleep(0.1)
            return -1.0

        def holders(role: str) -> list[int]:
            v = ready(live) or _view(addrs[min(live)]) or {}
            plan = v.get("plan") or {}
            names = {m["id"]: m.get("name") for m in v.get("members", [])}
            nodes_of = [s["node"] for r in plan.get("replicas", []) if r["role"] in (role, "both") for s in r["stages"]]
            return [int(str(names.get(n, ""))[1:]) for n in nodes_of if str(names.get(n, "")).startswith("n")
                    and int(str(names.get(n))[1:]) in live]

        def inject() -> None:
            for f in faults:
                time.sleep(1.0)
                if stop.is_set():
                    return
                t0 = time.monotonic()
                if f in ("kill-decoder", "kill-prefill", "kill-leader"):
                    v = _view(addrs[min(live)]) or {}
                    if f == "kill-leader":
                        names = {m["id"]: m.get("name") for m in v.get("members", [])}
                        cand = [int(str(names.get(v.get("leader"), "n-1"))[1:])]
                    else:
                        cand = holders("decoder" if f == "kill-decoder" else "prefill")
                    cand = [c for c in cand if c in live]
                    if len(live) <= 1 or not cand:
                        out["errors"][f"{f}:skipped"] = 1
                        continue
                    victim = cand[0]
                    old_leader = v.get("leader")
                    procs[victim].send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
                    with lock:
                        live.discard(victim)
                    if f == "kill-leader":
                        end = time.monotonic() + timeout
                        while time.monotonic() < end:
                            vs = [_view(addrs[i]) for i in sorted(live)]
                            if all(x and x.get("leader") not in (None, old_leader) for x in vs):
                                out["election_s"].append(round(time.monotonic() - t0, 3))
                                break
                            time.sleep(0.05)
                    out["recovery_s"].append(serving_again(t0, set(live)))
                elif f == "link-flap":
                    # one node's link goes down for 2 s: the others serve meanwhile (measured from
                    # the moment it went down), then it comes back
                    i = max(live)
                    subprocess.run(["ip", "link", "set", f"{prefix}h{i}", "down"], check=False)
                    out["recovery_s"].append(serving_again(t0, set(live) - {i}))
                    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
                    subprocess.run(["ip", "link", "set", f"{prefix}h{i}", "up"], check=False)
                elif f == "add-node":
                    start(nodes)
                    with lock:
                        live.add(nodes)

        injector = threading.Thread(target=inject)
        injector.start()
        counter = iter(range(1 << 30))

        def worker() -> None:
            # at least `requests` requests, and traffic until the last fault has been injected
            while True:
                k = next(counter)
                if k >= requests and not injector.is_alive():
                    return
                one(k)

        with ThreadPoolExecutor(concurrency) as pool:
            for fut in [pool.submit(worker) for _ in range(concurrency)]:
                fut.result()
        stop.set()
        injector.join()
        for i in sorted(live):
            v = _view(addrs[i]) or {}
            out["migrations"] += int(((v.get("serving") or {}).get("entry") or {}).get("migrations", 0))
        out["rss_mb_after"] = {f"n{i}": rss_mb(procs[i].pid) for i in sorted(live)}  # type: ignore[attr-defined]
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--nodes", type=int, default=3)
    u.add_argument("--rate-mbit", type=float, default=None)
    for q in (u, sub.add_parser("down"), sub.add_parser("exec")):
        q.add_argument("--prefix", default="mlab")
        q.add_argument("--net", type=int, default=77)
    b = sub.add_parser("serve-bench")
    b.add_argument("--nodes", type=int, default=3)
    b.add_argument("--rate-mbit", type=float, default=50.0)
    b.add_argument("--slowdowns", default="1,2,4")
    b.add_argument("--model", default=None)
    b.add_argument("--prefix", default="mlsb")
    b.add_argument("--net", type=int, default=78)
    c = sub.add_parser("chaos")
    c.add_argument("--nodes", type=int, default=5)
    c.add_argument("--requests", type=int, default=60)
    c.add_argument("--rate", type=float, default=None, help="tbf rate of every link, Mbit/s")
    c.add_argument("--faults", default=",".join(FAULTS), help=f"comma list, in order, of {', '.join(FAULTS)}")
    c.add_argument("--model", default=None)
    c.add_argument("--tokens", type=int, default=24)
    c.add_argument("--json", action="store_true", help="(the output is always one JSON object)")
    c.add_argument("--prefix", default="mlch")
    c.add_argument("--net", type=int, default=79)
    v = sub.add_parser("serve", help="meshllm bench serving's experiment on a lab mesh made from a testbed")
    from meshllm.bench.serving import register as register_serving

    register_serving(v)
    v.set_defaults(nodes=4)
    v.add_argument("--testbed", default=str(TESTBEDS / "lan.toml"),
                   help="devices (slowdowns from memory bandwidth) and link rates (default %(default)s)")
    v.add_argument("--dilate", type=float, default=1.0,
                   help="every device's slowdown times K and every link's rate over K: the testbed's LAN "
                        "K times slower, so that its nodes' compute shares this machine's cores less "
                        "(default 1)")
    v.add_argument("--prefix", default="mlsv")
    v.add_argument("--net", type=int, default=80)
    e = sub._name_parser_map["exec"]  # type: ignore[attr-defined]
    e.add_argument("index", type=int)
    e.add_argument("argv", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    why = why_unavailable()
    if why:
        print(f"netlab: {why}", file=sys.stderr)
        return 2
    if a.cmd == "chaos":
        bad = [f for f in a.faults.split(",") if f and f not in FAULTS]
        if bad:
            print(f"netlab: unknown faults {bad}; known: {', '.join(FAULTS)}", file=sys.stderr)
            return 2
        chaos(a.nodes, a.requests, a.rate, [f for f in a.faults.split(",") if f], a.model, a.prefix, a.net,
              tokens=a.tokens)
        return 0
    if a.cmd == "serve":
        from meshllm.errors import MeshError

        try:
            return serve(a)
        except MeshError as err:
            print(f"netlab serve: {err}", file=sys.stderr)
            return 1
    if a.cmd == "serve-bench":
        serve_bench(a.nodes, a.rate_mbit, [float(x) for x in a.slowdowns.split(",")], a.model, a.prefix, a.net)
        return 0
    if a.cmd == "up":
        lab = Lab(a.prefix, a.nodes, net=a.net, rate_mbit=a.rate_mbit).up()
        for i in range(a.nodes):
            print(f"{lab.ns(i)} {lab.addr(i)}")
        print(f"host (bridge {lab.bridge}) {lab.host_addr}")
    elif a.cmd == "down":
        Lab(a.prefix, 0, net=a.net).down()
    else:
        cmd = [x for x in a.argv if x != "--"] if a.argv[:1] == ["--"] else a.argv
        return subprocess.call(["ip", "netns", "exec", f"{a.prefix}ns{a.index}", *cmd])
    return 0


if __name__ == "__main__":
    sys.exit(main())
