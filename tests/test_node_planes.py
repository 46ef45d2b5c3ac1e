"""The node's seams for the data plane, in memory: frames dispatched by plane to registered
handlers (a bug in our handler is ours, not the peer's), the data-plane gate for loaded epochs,
the hooks, and draining that waits for requests in flight."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from test_node_sim import Mesh
from waiting import async_wait_until

from meshllm.errors import MeshError, RemoteProtocolError
from meshllm.wire.ids import RequestId
from meshllm.wire.messages import Free, Message


@pytest.fixture
async def mesh(tiny_model_dir: Path, tmp_path: Path):
    m = Mesh(tiny_model_dir, tmp_path)
    yield m
    await m.close()


async def test_data_frames_go_to_the_plane_handler_and_its_bugs_are_ours(
        mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="meshllm.node")
    a, b = await mesh.add(0), await mesh.add(1)
    await async_wait_until(lambda: a.node_id in b.transport.peers(), "a link between the two nodes", 20)
    got: list[tuple[str, Message]] = []
    # A node without a data-plane handler (every node registers the serving layer's; take it
    # away): the frame is dropped quietly, and it is nobody's error.
    a.driver.planes.pop("data")
    b.transport.send(a.node_id, b.codec.encode(Free(RequestId("early"))))
    await async_wait_until(lambda: "no handler for the data plane" in caplog.text, "the early frame dropped", 10)
    assert a.bad_frames == 0 and a.handler_errors == 0

    def handler(peer: str, msg: Message) -> None:
        if isinstance(msg, Free) and msg.req == "crash":
            raise KeyError("our own bug")
        if isinstance(msg, Free) and msg.req == "invalid":
            raise RemoteProtocolError("the peer sent nonsense")
        got.append((peer, msg))

    with pytest.raises(MeshError):
        a.register_plane("control", handler)
    a.register_plane("data", handler)
    for req in ("one", "crash", "invalid", "two"):
        b.transport.send(a.node_id, b.codec.encode(Free(RequestId(req))))
    await async_wait_until(lambda: len(got) == 2, "two data frames handled", 10)
    assert got == [(b.node_id, Free(RequestId("one"))), (b.node_id, Free(RequestId("two")))]
    assert a.handler_errors == 1  # the KeyError: a bug of ours
    assert a.bad_frames == 1  # only the frame the handler found invalid
    assert a.mesh_view()["stats"]["handler_errors"] == 1
    # The control plane is unaffected: the link is still up and heartbeats flow.
    assert b.node_id in a.transport.peers()


async def test_loaded_epochs_pass_the_gate_and_hooks_run(mesh: Mesh) -> None:
    a = await mesh.add(0)
    downs: list[str] = []
    actives: list[int] = []
    a.on_link_down_hooks.append(downs.append)
    a.on_epoch_active_hooks.append(lambda epoch, plan: actives.append(epoch))
    a.serving_view = lambda: {"queue": 0}
    b = await mesh.add(1)
    await mesh.until(lambda: mesh.agreed() is not None, "a plan on two nodes")
    _, _, epoch = mesh.agreed()
    assert epoch in actives and a.mesh_view()["serving"] == {"queue": 0}
    # An epoch this node has loaded but the control plane has not activated (the entry may start
    # a request a heartbeat before this stage hears PlanActivate): accepted.
    nb = a.manifest.config.num_blocks
    assert not a.accepts_epoch(epoch + 10)
    await a.stages.load(epoch + 10, [(0, nb)])
    assert not a.control.accepts_epoch(epoch + 10) and a.accepts_epoch(epoch + 10)
    a.stages.unload(epoch + 10)
    assert not a.accepts_epoch(epoch + 10)
    await b.kill()
    await async_wait_until(lambda: b.node_id in downs, "the link-down hook", 10)


async def test_planning_and_inference_run_on_different_threads(mesh: Mesh) -> None:
    a = await mesh.add(0)
    plan_thread = await a.planning.run(lambda: threading.current_thread().name)
    infer_thread = await a.stages.call(lambda: threading.current_thread().name)
    assert plan_thread.startswith("meshllm-plan") and infer_thread.startswith("meshllm-infer")


async def test_a_draining_epoch_unloads_only_when_its_requests_end(mesh: Mesh) -> None:
    for i in range(2):
        await mesh.add(i)
    await mesh.until(lambda: mesh.agreed() is not None, "a plan on two nodes")
    epoch = mesh.agreed()[2]
    node = mesh.nodes[0]
    unloaded: list[int] = []
    node.stages.on_unload(unloaded.append)
    node.stages.begin(epoch, "req-1")
    node.request_replan("test")
    await mesh.until(lambda: (a := mesh.agreed()) is not None and a[2] > epoch, "a new epoch")
    # The new epoch is active everywhere, but the old one still holds a request here.
    assert epoch in node.control.draining and node.stages.has_epoch(epoch) and node.accepts_epoch(epoch)
    node.stages.end(epoch, "req-1")
    await async_wait_until(lambda: not node.stages.has_epoch(epoch), "the drained epoch unloaded", 10)
    assert unloaded == [epoch] and epoch not in node.control.draining
