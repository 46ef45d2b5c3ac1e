"""What a LAN eavesdropper sees, and the API over TLS — real nodes (aiohttp links, HTTP) in this
process on loopback.

The capture: every byte each node's links hand to their WebSockets (a recording tap on the
transport, handshakes included) while a 3-node mesh plans itself and answers a prompt. With a
mesh key it holds none of the protocol's message type names or field names and not the prompt's
token ids; the same run on an open mesh (no key) finds all three kinds — so the check can fail.
Only the handshake's own three messages (hello, hello_reply, auth_proof: node ids, nonces,
proofs, a name and a port) are in the clear, and their names are not searched for.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import ssl
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from test_node_procs import free_port
from waiting import async_wait_until

from meshllm.control.config import ControlConfig
from meshllm.model.manifest import Manifest
from meshllm.net.base import DEFAULT_MESH_KEY
from meshllm.net.links import WsTransport
from meshllm.node import Node, NodeOptions
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner, resident_costs
from meshllm.runtime.sampling import SamplingParams
from meshllm.wire.messages import MESSAGE_TYPES, AuthProof, Hello, HelloReply

FAST = ControlConfig(heartbeat_interval=0.2, suspect_after=3, dead_after=8, election_timeout=0.6,
                     election_backoff=0.2, discovery_grace=0.4, replan_debounce=0.2, island_generations=3)
HANDSHAKE = (Hello, HelloReply, AuthProof)
# A prompt long and distinctive enough that its id sequence cannot turn up by chance.
PROMPT = [91, 7, 63, 12, 88, 45, 3, 70, 29, 54, 16, 81]


def protocol_names() -> tuple[set[str], set[str]]:
    """(message type names, field names) of every message after the handshake, long enough (6+
    characters) that ciphertext cannot contain one by chance, and not shared with the handshake."""
    shake = {c.TYPE for c in HANDSHAKE} | {f.name for c in HANDSHAKE for f in dataclasses.fields(c)}
    types, fields = set(), set()
    for cls in MESSAGE_TYPES.values():
        if cls in HANDSHAKE:
            continue
        types.add(cls.TYPE)
        fields |= {f.name for f in dataclasses.fields(cls)}
    keep = lambda names: {n for n in names if len(n) >= 6 and n not in shake}  # noqa: E731
    return keep(types), keep(fields)


async def three_nodes(tmp_path: Path, model_dir: Path, key: bytes, budget: int) -> list[Node]:
    ports = [free_port() for _ in range(3)]
    seeds = [(), (("127.0.0.1", ports[0]),), (("127.0.0.1", ports[0]),)]
    nodes = [Node.real(NodeOptions(model_dir=model_dir, state_dir=tmp_path / f"s{i}", mesh_key=key,
                                   name=f"c{i}", host="127.0.0.1", advertise_host="127.0.0.1", port=ports[i],
                                   peers=seeds[i], mdns=False, control=FAST, memory_budget=budget,
                                   verify_model=False))
             for i in range(3)]
    for n in nodes:
        await n.start()
    return nodes


@pytest.mark.parametrize("keyed", [True, False], ids=["mesh-key", "open-mesh"])
async def test_a_capture_of_the_links_holds_no_protocol_names_and_no_prompt_with_a_key(
        tmp_path: Path, tiny_model_dir: Path, tiny_manifest: Manifest, monkeypatch, keyed: bool) -> None:
    captured: list[bytes] = []
    monkeypatch.setattr(WsTransport, "tap", staticmethod(lambda me, peer, lane, data: captured.append(bytes(data))))
    key = uuid.uuid4().bytes if keyed else DEFAULT_MESH_KEY
    # Each node can hold about two thirds of the model: a replica spans nodes, so activations,
    # KV and tokens cross links, and some node holds no embedding and sends the prompt's ids on.
    budget = int(sum(c.param_bytes for c in resident_costs(tiny_manifest)) * 0.7)
    nodes = await three_nodes(tmp_path / ("k" if keyed else "o"), tiny_model_dir, key, budget)
    try:
        def agreed() -> bool:
            vs = [n.mesh_view() for n in nodes]
            return (all(v["ready"] and len(v["members"]) == 3 for v in vs)
                    and len({(v["term"], v["leader"], v["epoch"]) for v in vs}) == 1)

        await async_wait_until(agreed, "three nodes ready on one plan", 60)
        plan = nodes[0].control.active_plan
        embeds = {s["node"] for r in plan["replicas"] for s in r["stages"] if s["layers"][0] == 0}
        entry = next((n for n in nodes if n.node_id not in embeds), None)
        assert entry is not None, f"every node holds the embedding in {plan}: the prompt would cross no link"
        full = StageRunner(tiny_manifest, 0, tiny_manifest.config.num_blocks, threads=1)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        tokens = [ev.token_id async for ev in entry.serving.entry.generate(PROMPT, params)]
        assert tokens == list(generate(full, PROMPT, params).token_ids)
    finally:
        for n in nodes:
            await n.stop()
    wire = b"".join(captured)
    types, fields = protocol_names()
    found_types = {t for t in types if t.encode() in wire}
    found_fields = {f for f in fields if f.encode() in wire}
    ids = np.asarray(PROMPT, np.int64).tobytes()
    if keyed:
        assert not found_types and not found_fields and ids not in wire, (found_types, found_fields)
        assert len(wire) > 20_000  # the mesh did talk: plans, heartbeats, activations, tokens
    else:
        # the open mesh leaks all of it: the same checks find what they look for
        assert {"heartbeat", "plan_propose", "decode_batch"} <= found_types
        assert len(found_fields) >= 5 and ids in wire


def self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshllm-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return cert_file, key_file


async def test_the_api_dashboard_and_links_over_tls(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A node with --tls-cert/--tls-key: a client that trusts the certificate (a CA bundle) uses
    the dashboard, the OpenAI and the Ollama API over HTTPS with its API key; plain HTTP gets
    nothing; a peer without TLS links to it (wss://) and both plan together."""
    cert, tls_key = self_signed(tmp_path)
    ports = [free_port(), free_port()]
    key = uuid.uuid4().bytes
    opts = [NodeOptions(model_dir=tiny_model_dir, state_dir=tmp_path / f"s{i}", mesh_key=key, name=f"t{i}",
                        host="127.0.0.1", advertise_host="127.0.0.1", port=ports[i], mdns=False, control=FAST,
                        memory_budget=1 << 30, verify_model=False, api_key="an-api-key-of-ours",
                        peers=(("127.0.0.1", ports[0]),) if i == 1 else (),
                        tls_cert=str(cert) if i == 0 else None, tls_key=str(tls_key) if i == 0 else None)
            for i in range(2)]
    nodes = [Node.real(o) for o in opts]
    try:
        for n in nodes:
            await n.start()

        def agreed() -> bool:
            vs = [n.mesh_view() for n in nodes]
            return all(v["ready"] and len(v["members"]) == 2 for v in vs) and \
                len({(v["term"], v["leader"], v["epoch"]) for v in vs}) == 1

        await async_wait_until(agreed, "both nodes ready on one plan", 60)
        assert nodes[1].transport.peers() == [nodes[0].node_id]
        ctx = ssl.create_default_context(cafile=str(cert))  # verifies: the client trusts this certificate
        base = f"https://127.0.0.1:{ports[0]}"
        auth = {"Authorization": "Bearer an-api-key-of-ours"}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/", ssl=ctx) as r:
                assert r.status == 200 and "<html" in (await r.text()).lower()
            async with s.get(f"{base}/v1/dashboard", ssl=ctx) as r:
                assert r.status == 200 and isinstance(await r.json(), dict)
            async with s.get(f"{base}/v1/models", ssl=ctx) as r:
                assert r.status == 401  # the bearer token is still required, now over TLS
            async with s.get(f"{base}/v1/models", ssl=ctx, headers=auth) as r:
                assert r.status == 200 and (await r.json())["data"]
            async with s.post(f"{base}/v1/completions", ssl=ctx, headers=auth,
                              json={"prompt": PROMPT[:4], "max_tokens": 3, "ignore_eos": True}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()  # sampled at the default temperature: ignore_eos makes it 3 tokens
                assert body["usage"]["completion_tokens"] == 3, body
            async with s.get(f"{base}/api/tags", ssl=ctx, headers=auth) as r:
                assert r.status == 200 and "models" in await r.json()
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port gets no answer
                async with s.get(f"http://127.0.0.1:{ports[0]}/v1/mesh") as r:
                    await r.read()
    finally:
        for n in nodes:
            await n.stop()


def test_tls_options_go_in_pairs_and_a_bad_pair_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from meshllm.commands.node import build_options
    from meshllm.errors import UserError
    from meshllm.settings import add_arguments

    def opts(*argv: str) -> NodeOptions:
        import argparse

        p = argparse.ArgumentParser()
        add_arguments(p)
        return build_options(p.parse_args(["--model", str(tiny_model_dir), "--state-dir", str(tmp_path),
                                           "--host", "127.0.0.1", *argv]))

    cert, key = self_signed(tmp_path)
    o = opts("--tls-cert", str(cert), "--tls-key", str(key))
    assert (o.tls_cert, o.tls_key) == (str(cert), str(key))
    with pytest.raises(UserError, match="go together"):
        opts("--tls-cert", str(cert))
    with pytest.raises(UserError, match="cannot load the TLS certificate"):
        opts("--tls-cert", str(key), "--tls-key", str(cert))  # swapped
