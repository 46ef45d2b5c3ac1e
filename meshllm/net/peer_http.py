"""HTTP between peers: a member's profile document and link probes.

``PeerHttp`` is the seam: ``AiohttpPeerHttp`` speaks HTTP to a peer's ``/v1/profile`` and
``/v1/probe``; ``MemoryPeerHttp`` looks the nodes of one in-memory mesh up by address (probes are
not measured there, so plans use the planner's default network).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, Protocol

PROBE_SMALL = 32 * 1024  # bytes of the small and the large probe fetch
PROBE_BYTES = 544 * 1024


def mesh_token(key: bytes, purpose: str) -> str:
    """A bearer token for HTTP calls that need the mesh key (operator replan, link probes)."""
    return hmac.new(key, f"meshllm {purpose}".encode(), hashlib.sha256).hexdigest()


class PeerHttp:
    """Profile fetches and link probes; the real one speaks HTTP, the in-memory one looks nodes up."""

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        raise NotImplementedError

    async def fetch_json(self, host: str, port: int, path: str) -> dict[str, Any] | None:
        """A JSON object a peer serves at ``path`` (e.g. ``/v1/dashboard/node``), or None."""
        return None

    async def probe(self, host: str, port: int) -> tuple[float, float] | None:
        """(Mb/s into this node, round-trip ms) measured with a short transfer, or None."""
        return None

    async def close(self) -> None:
        return None


class AiohttpPeerHttp(PeerHttp):
    def __init__(self, token: str) -> None:
        self.token = token
        self._session: Any = None

    def _s(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self._session

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        return await self.fetch_json(host, port, "/v1/profile")

    async def fetch_json(self, host: str, port: int, path: str) -> dict[str, Any] | None:
        import aiohttp

        try:
            async with self._s().get(f"http://{host}:{port}{path}") as r:
                if r.status != 200:
                    return None
                doc = await r.json()
                return doc if isinstance(doc, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def probe(self, host: str, port: int) -> tuple[float, float] | None:
        """Round trip: the fastest of three empty fetches. Bandwidth: the slope between the fastest
        small and the fastest large fetch, so the fixed per-request cost cancels out."""
        import aiohttp

        from meshllm.net.server import PROBE_TOKEN_HEADER

        hdr = {PROBE_TOKEN_HEADER: self.token}
        url = f"http://{host}:{port}/v1/probe"

        async def fetch(n: int) -> float:
            t0 = time.perf_counter()
            async with self._s().get(url, params={"bytes": str(n)}, headers=hdr) as r:
                body = await r.read()
                if r.status != 200 or len(body) != n:
                    raise aiohttp.ClientError(f"probe answered {r.status}")
            return time.perf_counter() - t0

        try:
            rtt = min([await fetch(0) for _ in range(3)])
            small = min([await fetch(PROBE_SMALL) for _ in range(3)])
            large = min([await fetch(PROBE_BYTES) for _ in range(3)])
        except (aiohttp.ClientError, TimeoutError):
            return None
        dt = max(large - small, 1e-5)
        return (PROBE_BYTES - PROBE_SMALL) * 8 / dt / 1e6, rtt * 1000

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ProfileSource(Protocol):
    """What ``MemoryPeerHttp`` needs of a node: whether it is gone, and its ``/v1/profile``."""

    @property
    def closed(self) -> bool: ...
    def profile_view(self) -> dict[str, Any]: ...


class MemoryPeerHttp(PeerHttp):
    """Looks up nodes of one in-memory mesh by address; probes are not measured (default network)."""

    def __init__(self, registry: Mapping[tuple[str, int], ProfileSource]) -> None:
        self.registry = registry

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        node = self.registry.get((host, port))
        return None if node is None or node.closed else node.profile_view()
