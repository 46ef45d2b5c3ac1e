"""A plan's part on this node, beside the stage host (``serve.stages.StageHost``) that holds it.

``PlanLoader`` answers the control plane's plan work on every node:

- ``validate``: the planner's ``validate_plan`` over the devices this node knows (the control plane
  calls it before it acknowledges a proposed plan);
- ``load``: this node's block ranges of an epoch's plan onto the stage host, with the attention
  kind the plan names (``runtime.attention.of_plan``: the leader's choice for the whole mesh,
  whatever this node's own setting), then ``PlanLoaded`` back to the control plane (success, or
  why not);
- ``accepts_epoch``: the data-plane gate (an epoch loaded here, or one the control plane serves).

The devices and links a node knows (``known_devices``, ``known_network``) are what it validates
plans against and what the serving layer's estimator scores replicas with: its own profile, the
profiles it fetched from its peers, and the ones the leader gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from meshllm.control.events import PlanLoaded
from meshllm.control.node import ControlNode
from meshllm.control.planning import known_devices, my_ranges, network_from_links
from meshllm.errors import MeshError, PlanError
from meshllm.net.dialer import PeerInfo
from meshllm.planner.cost import ModelProfile
from meshllm.planner.types import Device, Network, Plan
from meshllm.planner.validate import validate_plan
from meshllm.runtime.attention import of_plan
from meshllm.runtime.profile import NodeProfile

if TYPE_CHECKING:
    from meshllm.serve.stages import StageHost

log = logging.getLogger("meshllm.node")


class PlanLoader:
    """``profile`` is this node's measured profile (None until measured); ``peers`` the peers the
    dialer knows; ``link_stats`` this node's link measurements; ``budget`` its memory budget in
    bytes; ``step`` feeds an event to the control plane."""

    def __init__(self, node_id: str, model_profile: ModelProfile, stages: StageHost, *,
                 control: Callable[[], ControlNode | None], profile: Callable[[], NodeProfile | None],
                 peers: Callable[[], Mapping[str, PeerInfo]],
                 link_stats: Callable[[], Mapping[str, Mapping[str, float]]], budget: Callable[[], int],
                 step: Callable[[Any], None]) -> None:
        self.node_id = node_id
        self.model_profile = model_profile
        self.stages = stages
        self._control = control
        self._profile = profile
        self._peers = peers
        self._link_stats = link_stats
        self._budget = budget
        self._step = step

    # --- what this node knows of the mesh's devices ---------------------------------------------------
    def known_devices(self) -> dict[str, Device]:
        """Every node whose profile this node has (its own, fetched ones, the leader's gathered ones)."""
        control, peers, profile = self._control(), self._peers(), self._profile()
        docs: dict[str, dict[str, Any] | None] = {self.node_id: profile.to_dict() if profile else None}
        if control is not None:
            for nid in control.membership.members:
                prof = (peers[nid].profile or {}).get("profile") if nid in peers else None
                docs[nid] = prof or control.profiles.get(nid)
        return known_devices(docs)

    def known_network(self, nodes: list[str]) -> Network:
        """The links between ``nodes`` as measured by this node and reported by its peers."""
        peers = self._peers()
        links: dict[str, dict[str, Any]] = {self.node_id: dict(self._link_stats())}
        for nid in nodes:
            doc = peers[nid].profile if nid in peers else None
            if doc and isinstance(doc.get("links"), dict):
                links[nid] = doc["links"]
        return network_from_links(nodes, links)

    # --- plans ------------------------------------------------------------------------------------------
    def validate(self, doc: dict[str, Any]) -> None:
        """The planner's ``validate_plan`` over the devices this node knows: its own exact budget,
        fetched profiles of peers, and members whose budget it has not seen yet (memory unchecked).
        Nodes that are not members are unknown devices, so a plan naming them fails."""
        control = self._control()
        assert control is not None
        known = self.known_devices()
        devices = [known.get(self.node_id) or Device(self.node_id, self._budget(), 1.0, 1.0)]
        devices += [known.get(nid) or Device(nid, 1 << 62, 1.0, 1.0) for nid in control.membership.members]
        validate_plan(Plan.from_dict(doc), self.model_profile, devices)
        of_plan(doc)  # an attention kind this node can run

    async def load(self, epoch: int, doc: dict[str, Any]) -> None:
        try:
            ranges = my_ranges(doc, self.node_id)
            kind = of_plan(doc)
        except PlanError as e:
            self._step(PlanLoaded(epoch, False, str(e)))
            return
        try:
            await self.stages.load(epoch, ranges, attention=kind)
        except (MeshError, OSError, RuntimeError) as e:
            log.warning("cannot load epoch %d: %s", epoch, e)
            self._step(PlanLoaded(epoch, False, str(e)))
            return
        if not self.stages.has_epoch(epoch):
            return  # unloaded while it loaded (superseded): the control plane no longer wants it
        log.info("loaded blocks %s (%s attention) for epoch %d", ranges or "(none)", kind, epoch)
        self._step(PlanLoaded(epoch, True))

    def accepts_epoch(self, epoch: int) -> bool:
        """The data-plane gate: any epoch loaded here (the entry may activate an epoch a heartbeat
        before a stage hears ``PlanActivate``), and what the control plane serves (active or
        draining)."""
        if self.stages.has_epoch(epoch):
            return True
        control = self._control()
        return control is not None and control.accepts_epoch(epoch)
