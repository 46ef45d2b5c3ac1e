"""Control plane: membership, election, plan epochs, GA islands and drift as sans-IO state
machines. Pure: logical time in, outputs out (see ``docs/control.md``).

- ``ControlNode`` (``node``): one node's whole control plane; drive it with ``tick(now)`` and
  ``step(event)``, perform the outputs (``events``).
- ``ControlConfig`` (``config``): every timing and threshold.
- ``Membership``, ``Election``, ``IslandCoordinator``, ``DriftDetector``: the parts, usable alone.
- ``simnet``: a deterministic in-memory network and a simulated cluster for tests.
"""

from meshllm.control.config import ControlConfig
from meshllm.control.drift import DriftDetector, DriftReport
from meshllm.control.election import Election, Role
from meshllm.control.islands import IslandCoordinator, default_merge
from meshllm.control.membership import Liveness, Membership
from meshllm.control.node import ControlNode, default_plan_nodes, default_planned_lengths

__all__ = [
    "ControlConfig", "ControlNode", "DriftDetector", "DriftReport", "Election", "IslandCoordinator",
    "Liveness", "Membership", "Role", "default_merge", "default_plan_nodes", "default_planned_lengths",
]
