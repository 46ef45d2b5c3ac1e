"""The views and the node collector read a node only through its ports: built here by hand, with
no ``Node`` and no control plane yet, they answer from what the ports say and nothing else."""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from meshllm.model.manifest import Manifest
from meshllm.obs.metrics import NodeCollector
from meshllm.planner.cost import ModelProfile
from meshllm.ports import Identity, NodePorts, Peers, Plans, Profiles, Stats
from meshllm.runtime.runner import resident_costs
from meshllm.views import member_names, mesh_view, profile_view
from meshllm.wire.codec import Codec


class _Stages:
    budget_bytes = 1 << 30

    def epochs(self) -> list[int]:
        return []

    def runners(self, epoch: int) -> list[Any]:
        return []

    def ranges(self, epoch: int) -> list[tuple[int, int]]:
        return []

    def has_epoch(self, epoch: int) -> bool:
        return False


class _Transport:
    def __init__(self) -> None:
        self.bytes_sent = Counter({"peer-b": 300})
        self.bytes_received = Counter({"peer-b": 120})

    def peers(self) -> list[str]:
        return ["peer-b"]


def ports(manifest: Manifest) -> NodePorts:
    async def fetch_json(host: str, port: int, path: str) -> dict[str, Any] | None:
        return None

    return NodePorts(
        identity=Identity("node-a", "kitchen", manifest, "mesh-1", Codec(), addr=lambda: "10.0.0.7:7070",
                          mesh_keyed=True, api_key_required=False),
        plans=Plans(control=lambda: None, accepts_epoch=lambda e: False, observe_request=lambda i, o: None),
        peers=Peers(transport=lambda: _Transport(), known=lambda: {},
                    link_stats=lambda: {"peer-b": {"mbps": 940.0, "rtt_ms": 0.4}},
                    linked_addresses=lambda: {"peer-b": "10.0.0.8:7070"}, fetch_json=fetch_json),
        profiles=Profiles(own=lambda: None, progress=lambda: "3/8 blocks",
                          model=ModelProfile.from_costs(resident_costs(manifest), manifest.name)),
        stages=_Stages(), stats=lambda: Stats(bad_frames=2, links_dropped=1), serving_view=lambda: None)


def test_the_views_answer_from_the_ports_alone(bundled_manifest: Manifest) -> None:
    p = ports(bundled_manifest)
    prof = profile_view(p)
    assert (prof["node_id"], prof["name"], prof["addr"], prof["mesh_id"]) == ("node-a", "kitchen", "10.0.0.7:7070",
                                                                             "mesh-1")
    assert prof["model_id"] == bundled_manifest.model_id and prof["profile"] is None
    assert prof["profile_progress"] == "3/8 blocks" and prof["peers"] == {"peer-b": "10.0.0.8:7070"}
    assert prof["links"] == {"peer-b": {"mbps": 940.0, "rtt_ms": 0.4}}
    assert mesh_view(p) == {"node": {"id": "node-a", "name": "kitchen"}, "ready": False, "why_not_ready": "starting"}
    assert member_names(p) == {"node-a": "kitchen"}


def test_the_node_collector_reads_the_ports(bundled_manifest: Manifest) -> None:
    reg = CollectorRegistry()
    reg.register(NodeCollector(ports(bundled_manifest), lambda: {"peer-b": "pantry"}))
    text = generate_latest(reg).decode()
    assert f'meshllm_node_info{{model="{bundled_manifest.name}",name="kitchen",node_id="node-a"}} 1.0' in text
    assert "meshllm_frames_dropped_total 2.0" in text and "meshllm_links_dropped_total 1.0" in text
    assert 'meshllm_link_sent_bytes_total{peer="pantry"} 300.0' in text
    assert 'meshllm_link_received_bytes_total{peer="pantry"} 120.0' in text
    assert "meshllm_links_up 1.0" in text and "meshllm_election_term" not in text  # no control plane yet
