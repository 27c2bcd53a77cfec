"""The runtime against FakeChildren: swaps, drains, crashes, cancellations and stop causes, in milliseconds.

No llama-server here: what is tested is how the runtime carries out the core's decisions and reports what
happened (notices, metrics), including when an effect raises.
"""

from __future__ import annotations

import asyncio
import errno

import pytest
from fake_children import FakeChildren

from model_supervisor.config import LiveConfig, parse_config
from model_supervisor.errors import ApiError
from model_supervisor.gpu import FixedProbe
from model_supervisor.http.documents import take_snapshot
from model_supervisor.metrics import Metrics
from model_supervisor.notices import ChildStopped, Notice
from model_supervisor.runtime import Runtime
from model_supervisor.scheduler import Tick

pytestmark = pytest.mark.timeout(10)


def config(**daemon):
    return parse_config({
        "daemon": {"queue_timeout_s": 5, "drain_timeout_s": 5, **daemon},
        "models": {name: {"model": f"/m/{name}.gguf", "vram_mb": 1000} for name in ("a", "b")},
    })  # fmt: skip


@pytest.fixture
async def rig():
    children = FakeChildren()
    runtime = Runtime(LiveConfig(config()), children, FixedProbe(total_mb=100_000))
    notices: list[Notice] = []
    runtime.observers.append(notices.append)
    await runtime.start()
    yield runtime, children, notices
    await runtime.close()


def stops(notices: list[Notice]) -> list[tuple[str, str]]:
    return [(n.model, n.cause) for n in notices if isinstance(n, ChildStopped)]


async def test_swap_stops_the_resident_model_before_starting_the_next(rig):
    runtime, children, notices = rig
    runtime.release(await runtime.acquire("a"))
    ticket = await runtime.acquire("b")
    assert ticket.upstream is not None and ticket.upstream.pid == children.running["b"]
    assert children.started == ["a", "b"] and children.stopped == [("a", "swap")]
    assert list(children.running) == ["b"]
    assert stops(notices) == [("a", "swap")]
    runtime.release(ticket)


async def test_a_busy_model_drains_before_the_swap(rig):
    runtime, children, _ = rig
    held = await runtime.acquire("a")
    waiting = asyncio.ensure_future(runtime.acquire("b"))
    await runtime.wait_until(lambda: runtime.core.models["b"].name in {w.model for w in runtime.core.waiters.values()})
    assert children.stopped == [] and not waiting.done()  # a serves its request to the end
    runtime.release(held)
    ticket = await asyncio.wait_for(waiting, 1)
    assert ticket.model == "b" and children.stopped == [("a", "swap")]
    runtime.release(ticket)


async def test_a_crash_mid_request_fails_the_model_and_the_next_request_restarts_it(rig):
    runtime, children, _ = rig
    ticket = await runtime.acquire("a")
    children.crash("a")
    await runtime.wait_until(lambda: runtime.core.models["a"].phase.value == "failed")
    assert "was killed" in runtime.core.models["a"].last_error
    assert runtime.core.models["a"].in_flight == 0  # written off with the child
    runtime.release(ticket)  # the request's own end changes nothing now
    assert runtime.core.models["a"].in_flight == 0
    again = await runtime.acquire("a")  # after the backoff (0.5 s), a new child
    assert again.upstream.pid != ticket.upstream.pid and children.started == ["a", "a"]
    runtime.release(again)


async def test_a_request_cancelled_during_the_load_leaves_no_place_and_no_ticket(rig):
    runtime, children, _ = rig
    gate = children.hold("a")
    request = asyncio.ensure_future(runtime.acquire("a"))
    await children.start_entered.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert runtime.core.waiters == {}
    gate.set()  # the load goes on: the next request finds the model ready
    await runtime.wait_until(lambda: runtime.core.models["a"].phase.value == "ready")
    assert runtime.core.models["a"].in_flight == 0


async def test_unload_during_a_load_stops_it_with_cause_admin_in_the_notice_and_the_metric(rig):
    runtime, children, notices = rig
    metrics = Metrics(lambda: take_snapshot(runtime))
    runtime.observers.append(metrics.on_notice)
    children.hold("a")
    loading = asyncio.ensure_future(runtime.load("a"))
    await children.start_entered.wait()
    await asyncio.wait_for(runtime.unload("a"), 1)
    assert children.stopped[0] == ("a", "admin")
    assert stops(notices)[0] == ("a", "admin")
    text = metrics.render().decode()
    assert 'model_supervisor_unloads_total{cause="admin",model="a"} 1.0' in text
    assert 'cause="swap"' not in text
    loading.cancel()


async def test_a_start_that_raises_answers_the_waiters_at_once_and_does_not_wedge_the_model(rig):
    runtime, children, _ = rig
    children.failures["a"] = OSError(errno.E2BIG, "Argument list too long")
    with pytest.raises(ApiError) as refused:
        await asyncio.wait_for(runtime.acquire("a"), 1)
    assert refused.value.status == 503 and refused.value.code == "model_load_failed"
    assert "Argument list too long" in refused.value.message
    assert runtime.core.models["a"].phase.value == "failed"
    await asyncio.wait_for(runtime.unload("a"), 1)  # answers: nothing is stuck loading
    assert runtime.core.models["a"].phase.value == "unloaded"
    runtime.release(await asyncio.wait_for(runtime.acquire("b"), 1))  # its group is free too
    ticket = await asyncio.wait_for(runtime.acquire("a"), 1)  # and a starts again once the fault is gone
    assert ticket.model == "a"
    runtime.release(ticket)


async def test_unload_under_steady_traffic_finishes_within_the_drain_bound(rig):
    runtime, children, _ = rig
    runtime.live.current = runtime.core.config = config(drain_timeout_s=0.3)
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                ticket = await runtime.acquire("a")
            except ApiError:
                continue
            await asyncio.sleep(0.005)
            runtime.release(ticket)

    clients = [asyncio.ensure_future(client()) for _ in range(4)]
    await runtime.wait_until(lambda: runtime.core.models["a"].phase.value == "ready")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(runtime.unload("a"), 2)
    assert loop.time() - started < 1.0
    assert ("a", "admin") in children.stopped
    stop.set()
    await asyncio.gather(*clients)


async def test_an_observer_that_raises_breaks_nothing(rig):
    runtime, _, _ = rig

    def broken(notice: Notice) -> None:
        raise RuntimeError("observer bug")

    runtime.observers.insert(0, broken)
    runtime.release(await runtime.acquire("a"))
    assert runtime.core.models["a"].phase.value == "ready"


def test_the_runtime_runs_on_uvloop_as_the_daemon_does():
    """`model-supervisor run` uses uvloop where it is installed: its loop and handles differ from asyncio's (no
    TimerHandle.when(), for one), so the timer-driven paths run on it here too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        children = FakeChildren()
        runtime = Runtime(LiveConfig(config(queue_timeout_s=0.05)), children, FixedProbe(total_mb=100_000))
        await runtime.start()
        try:
            held = await runtime.acquire("a")
            with pytest.raises(ApiError) as waited:  # b waits for a to drain: its queue timeout fires on the timer
                await runtime.acquire("b")
            assert waited.value.code == "queue_timeout"
            waiting = asyncio.ensure_future(runtime.acquire("b", wait_s=5))
            await runtime.wait_until(lambda: any(w.model == "b" and not w.detached
                                                 for w in runtime.core.waiters.values()))
            runtime.release(held)  # a change while b's deadline is armed: the timer is re-armed, not rebuilt
            runtime.release(await waiting)  # the swap goes on
            assert children.stopped == [("a", "swap")]
            # A deadline already due (uvloop then hands back a plain Handle, with no when()) re-armed by the next
            # change before it runs: as when a request's X-Max-Wait-Ms is 0 or a retry falls due.
            due = runtime.now() - 0.001
            runtime.core.next_wakeup = lambda: due
            runtime.dispatch(Tick(runtime.now()))
            runtime.dispatch(Tick(runtime.now()))
            del runtime.core.next_wakeup  # the core's own again
            runtime.dispatch(Tick(runtime.now()))
        finally:
            await runtime.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
