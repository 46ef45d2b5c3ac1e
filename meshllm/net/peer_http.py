"""HTTP between peers: a member's profile document and link probes.

``PeerHttp`` is the seam: ``AiohttpPeerHttp`` speaks HTTP to a peer's ``/v1/profile`` and
``/v1/probe``; ``MemoryPeerHttp`` looks the nodes of one in-memory mesh up by address (probes are
not measured there, so plans use the planner's default network).

Every JSON answer a node takes from a peer is authenticated by the mesh key: the request carries
a fresh challenge (``X-Meshllm-Challenge``), the peer's server answers with
``X-Meshllm-Mac = HMAC(key, challenge | path | status | body)`` (``meshllm.net.server``), and an
answer without the right MAC is dropped. So a LAN host that answers at a member's address (a
forged advert, a spoofed IP) cannot feed planning, routing or the dashboard. A peer's port may
speak TLS; its certificate is not checked (the MAC is what authenticates the answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

PROBE_SMALL = 32 * 1024  # bytes of the small and the large probe fetch
PROBE_BYTES = 544 * 1024
PROBE_ROUNDS = 3  # rounds of fetches at most, until the large fetch stands clear of the small one


def slope_holds(small_s: float, large_s: float) -> bool:
    """Whether the large fetch took clearly longer than the small one (a tenth of its time at
    least): on a busy machine the fastest small fetch can come out as slow as the large one, and
    a slope over nothing would read as an absurd bandwidth."""
    return large_s - small_s >= 0.1 * large_s


def probe_mbps(small_s: float, large_s: float) -> float:
    """A link's bandwidth from the fastest small and large probe fetches: the slope between them,
    so that the fixed cost of a request cancels out; where the slope does not hold, the large
    fetch alone (a lower bound: it counts the fixed cost too)."""
    dt = large_s - small_s if slope_holds(small_s, large_s) else large_s
    return (PROBE_BYTES - PROBE_SMALL) * 8 / dt / 1e6


CHALLENGE_HEADER = "X-Meshllm-Challenge"
MAC_HEADER = "X-Meshllm-Mac"
CHALLENGE_MAX = 64  # hex digits a server accepts in a challenge
PROBE_TOKEN_HEADER = "X-Meshllm-Probe"  # a member's token for GET /v1/probe


def mesh_token(key: bytes, purpose: str) -> str:
    """A bearer token for HTTP calls that need the mesh key (operator replan, link probes)."""
    return hmac.new(key, f"meshllm {purpose}".encode(), hashlib.sha256).hexdigest()


def http_mac_key(mesh_key: bytes) -> bytes:
    """The key that MACs peers' HTTP answers (derived from the mesh key, used for nothing else)."""
    return hmac.new(mesh_key, b"meshllm peer http mac v1", hashlib.sha256).digest()


def response_mac(key: bytes, challenge: str, path: str, status: int, body: bytes) -> str:
    head = b"\0".join((b"meshllm-http-v1", challenge.encode(), path.encode(), str(status).encode()))
    return hmac.new(key, len(head).to_bytes(4, "big") + head + body, hashlib.sha256).hexdigest()


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
    """``token``: the probe token; ``mac_key``: ``http_mac_key(mesh key)``, which every JSON
    answer must be MACed with."""

    def __init__(self, token: str, mac_key: bytes = b"", *, tls: bool = False) -> None:
        self.token = token
        self.mac_key = mac_key
        self.tls = tls  # our own port speaks TLS: try a peer's port with TLS first
        self.rejected = 0  # answers dropped for a missing or wrong MAC
        self._schemes: dict[tuple[str, int], str] = {}
        self._session: Any = None

    def _s(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self._session

    async def fetch_profile(self, host: str, port: int) -> dict[str, Any] | None:
        return await self.fetch_json(host, port, "/v1/profile")

    async def _get(self, host: str, port: int, path: str, **kw: Any) -> Any:
        """``GET`` on a peer's port over the scheme that worked there before, else plain HTTP and
        then TLS (or the other way round when our port speaks TLS). A context manager's response."""
        import aiohttp

        from meshllm.net.base import client_ssl

        known = self._schemes.get((host, port))
        schemes = [known] if known else (["https", "http"] if self.tls else ["http", "https"])
        err: BaseException | None = None
        for scheme in schemes:
            try:
                r = await self._s().get(f"{scheme}://{host}:{port}{path}",
                                        ssl=client_ssl() if scheme == "https" else True, **kw)
            except (aiohttp.ClientError, OSError) as e:
                err = err or e
                continue
            self._schemes[(host, port)] = scheme
            return r
        assert err is not None
        raise err

    async def fetch_json(self, host: str, port: int, path: str) -> dict[str, Any] | None:
        import aiohttp

        challenge = os.urandom(16).hex()
        try:
            async with await self._get(host, port, path, headers={CHALLENGE_HEADER: challenge}) as r:
                if r.status != 200:
                    return None
                body = await r.read()
                want = response_mac(self.mac_key, challenge, path, r.status, body)
                if not hmac.compare_digest(r.headers.get(MAC_HEADER, "").encode(), want.encode()):
                    self.rejected += 1
                    return None
                doc = json.loads(body)
                return doc if isinstance(doc, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def probe(self, host: str, port: int) -> tuple[float, float] | None:
        """Round trip: the fastest of three empty fetches. Bandwidth: the slope between the fastest
        small and the fastest large fetch, so the fixed per-request cost cancels out."""
        import aiohttp


        hdr = {PROBE_TOKEN_HEADER: self.token}

        async def fetch(n: int) -> float:
            t0 = time.perf_counter()
            async with await self._get(host, port, "/v1/probe", params={"bytes": str(n)}, headers=hdr) as r:
                body = await r.read()
                if r.status != 200 or len(body) != n:
                    raise aiohttp.ClientError(f"probe answered {r.status}")
            return time.perf_counter() - t0

        try:
            rtt = min([await fetch(0) for _ in range(3)])
            small, large = math.inf, math.inf
            for _ in range(PROBE_ROUNDS):
                small = min([small] + [await fetch(PROBE_SMALL) for _ in range(3)])
                large = min([large] + [await fetch(PROBE_BYTES) for _ in range(3)])
                if slope_holds(small, large):
                    break
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return probe_mbps(small, large), rtt * 1000

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
