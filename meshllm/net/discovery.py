"""mDNS discovery with python-zeroconf: announce ``_meshllm._tcp.local.`` and browse for peers.

The TXT record is small and public: node id, protocol version, port and mesh id (a hash of the
model and the mesh key, never the key). It is a hint: the link handshake is what proves a peer
belongs to the mesh. Adverts of another mesh id or protocol version are ignored (logged a few
lines a minute, with counts). What a LAN can make this node hold is bounded: at most
``MAX_RESOLVING`` adverts are being resolved at once (the rest are dropped and counted) and at
most ``MAX_NAMES`` service names are remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshllm.errors import UserError
from meshllm.net.base import PROTOCOL_VERSION, SERVICE_TYPE, Advert, Discovery, OnFound, OnLost, RefusalLog

log = logging.getLogger("meshllm.net.discovery")

MAX_RESOLVING = 32  # adverts resolved at once
MAX_NAMES = 1024  # service names remembered (to report a member lost when its name goes)


def interface_addresses(names: list[str]) -> list[str]:
    """IPv4 addresses for a list of interface names or literal addresses."""
    out: list[str] = []
    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    for n in names:
        try:
            ipaddress.IPv4Address(n)
            out.append(n)
            continue
        except ValueError:
            pass
        a = adapters.get(n)
        if a is None:
            raise UserError(f"no network interface {n!r} (have: {', '.join(sorted(adapters))})")
        v4 = [str(ip.ip) for ip in a.ips if isinstance(ip.ip, str)]
        if not v4:
            raise UserError(f"interface {n!r} has no IPv4 address")
        out.extend(v4)
    return out


def multicast_unavailable(address: str = "127.0.0.1") -> str | None:
    """None when this host can join the mDNS multicast group on ``address``, else why not."""
    import struct

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        mreq = struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(address))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
    except OSError as e:
        return f"cannot join the mDNS multicast group on {address}: {e}"
    finally:
        s.close()
    return None


def advert_to_txt(ad: Advert) -> dict[str, str]:
    return {"id": ad.node_id, "v": str(ad.proto), "port": str(ad.port), "mesh": ad.mesh_id}


def advert_from_info(info: AsyncServiceInfo) -> Advert | None:
    """Parse a resolved service; None when it is not a well-formed meshllm advert."""
    props: dict[bytes, bytes | None] = info.properties or {}

    def get(k: str) -> str | None:
        v = props.get(k.encode())
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else None

    node_id, mesh, v, port = get("id"), get("mesh"), get("v"), get("port")
    addrs = info.parsed_addresses(IPVersion.V4Only)
    if not node_id or not mesh or not v or not addrs:
        return None
    try:
        proto = int(v)
        p = int(port) if port else int(info.port or 0)
    except ValueError:
        return None
    if not 0 < p < 65536:
        return None
    return Advert(node_id=node_id, host=addrs[0], port=p, mesh_id=mesh, proto=proto)


class ZeroconfDiscovery(Discovery):
    """Announce and browse on the given IPv4 addresses (all interfaces when empty)."""

    def __init__(self, addresses: list[str], *, hint_after: float = 15.0, request_timeout_ms: int = 3000,
                 instance_name: str | None = None, has_peers: Callable[[], bool] | None = None) -> None:
        self.addresses = addresses
        self.hint_after = hint_after
        self.has_peers = has_peers  # no hint when peers came some other way (--peer seeds)
        self.request_timeout_ms = request_timeout_ms
        self.instance_name = instance_name
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered: Any = None
        self._advert: Advert | None = None
        self._names: dict[str, str] = {}  # service name -> node id
        self._tasks: set[asyncio.Task[Any]] = set()
        self._found_any = asyncio.Event()
        self._on_found: OnFound = lambda ad: None
        self._on_lost: OnLost = lambda nid: None
        self._resolving = 0
        self.dropped = 0  # adverts not resolved: too many at once
        self._refusals = RefusalLog(log, time.monotonic, level=logging.INFO)

    async def start(self, advert: Advert, on_found: OnFound, on_lost: OnLost) -> None:
        self._advert, self._on_found, self._on_lost = advert, on_found, on_lost
        interfaces: Any = self.addresses or None
        kw: dict[str, Any] = {"ip_version": IPVersion.V4Only}
        if interfaces:
            kw["interfaces"] = interfaces
        self._azc = AsyncZeroconf(**kw)
        label = (self.instance_name or "node")[:30].replace(".", "-")
        name = f"{label}-{advert.node_id[:12]}.{SERVICE_TYPE}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, name, port=advert.port, properties=advert_to_txt(advert),
            addresses=[socket.inet_aton(advert.host)], server=f"meshllm-{advert.node_id[:12]}.local.")
        # The returned task completes once probing and announcements are done; the browser can
        # start meanwhile.
        self._registered = await self._azc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._spawn(self._hint())
        log.info("mDNS: announcing %s on %s", name, ", ".join(self.addresses) or "all interfaces")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._azc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._info is not None:
            with contextlib.suppress(Exception):
                if self._registered is not None:
                    await self._registered
                # Waiting for the goodbye packets is what lets peers drop us at once.
                await (await self._azc.async_unregister_service(self._info))
        await self._azc.async_close()
        self._azc = None

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _hint(self) -> None:
        try:
            await asyncio.wait_for(self._found_any.wait(), self.hint_after)
        except TimeoutError:
            if self.has_peers is not None and self.has_peers():
                return
            log.warning("mDNS found no other meshllm node in %.0f s; if multicast does not cross this "
                        "network (Docker bridge, some Wi-Fi), name a peer with --peer HOST:PORT",
                        self.hint_after)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            nid = self._names.pop(name, None)
            if nid is not None:
                self._on_lost(nid)
            return
        if self._resolving >= MAX_RESOLVING:
            self.dropped += 1
            self._refusals.refused("resolve", f"mDNS: more than {MAX_RESOLVING} adverts at once; dropped {name}")
            return
        self._resolving += 1
        self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        try:
            await self._resolve_one(name)
        finally:
            self._resolving -= 1

    async def _resolve_one(self, name: str) -> None:
        assert self._azc is not None and self._advert is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, self.request_timeout_ms):
            log.debug("mDNS: %s did not resolve", name)
            return
        ad = advert_from_info(info)
        if ad is None:
            log.debug("mDNS: %s is not a well-formed meshllm advert", name)
            return
        if ad.node_id == self._advert.node_id:
            return
        if ad.mesh_id != self._advert.mesh_id or ad.proto != PROTOCOL_VERSION:
            self._refusals.refused(ad.host, f"mDNS: ignoring {name} at {ad.addr} (another mesh or protocol version)")
            return
        self._names.pop(name, None)
        self._names[name] = ad.node_id
        while len(self._names) > MAX_NAMES:  # forget the oldest
            del self._names[next(iter(self._names))]
        self._found_any.set()
        self._on_found(ad)
