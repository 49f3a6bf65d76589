"""What the proxy batches so that many requests pay once: the writes to a guest connection
(protocol.CoalescingTransport: until the answer is complete or the loop pass ends), the metric
updates of every request (metrics.Metrics) and the access log lines (logs.AccessLog), both
for batch.DELAY through one batch.Batch each.

The transport under CoalescingTransport is a recording stand-in for asyncio's (the one
thing here that is not ours); end to end, every test in test_e2e.py and test_hostile.py
(pipelined requests included) talks to guests through CoalescingTransport. The batches'
waits are asserted as scheduled, on an event loop whose timers fire when the test says
(`ManualTimers`), so a pause of the test process cannot make them fire early.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from metadata_proxy import batch, logs
from metadata_proxy.config import ListenAddress
from metadata_proxy.logs import AccessLog
from metadata_proxy.metrics import Metrics
from metadata_proxy.protocol import COALESCE_BYTES, CoalescingTransport, GuestProtocol, GuestSide
from metadata_proxy.server import _uvicorn_config, bind_listen
from tests.harness import free_port
from tests.test_hostile import INSTANCE, local_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingTransport(asyncio.Transport):
    """Records what reaches the socket: each write() call is one system call in a real one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.1.0.2", 40000)}.get(name, default)


async def next_pass() -> None:
    """Let the loop finish the current pass (and run what was scheduled at its end)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


class ManualTimers(asyncio.SelectorEventLoop):
    """An asyncio loop whose call_later only records: the test fires the timers (`fire`),
    as if their delay had passed. Everything else (passes, call_soon) runs as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[tuple[float, asyncio.TimerHandle]] = []

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(self.time() + delay, callback, args, self, context)
        self.timers.append((delay, handle))
        return handle

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _, handle in timers:
            if not handle.cancelled():
                handle._run()


def on_manual_timers(test: Any) -> None:
    """Run the coroutine `test(loop)` on a ManualTimers loop."""
    loop = ManualTimers()
    try:
        loop.run_until_complete(test(loop))
    finally:
        loop.close()


async def test_the_writes_of_one_pass_leave_in_one_write_at_its_end() -> None:
    real = RecordingTransport()
    guest = CoalescingTransport(real, asyncio.get_running_loop())
    guest.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    guest.write(b"{}")
    assert real.writes == []  # nothing yet: the pass is not over
    await next_pass()
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    guest.write(b"next")
    await next_pass()
    assert real.writes[1:] == [b"next"]


async def test_a_large_write_goes_at_once() -> None:
    real = RecordingTransport()
    guest = CoalescingTransport(real, asyncio.get_running_loop())
    guest.write(b"head")
    guest.write(b"x" * COALESCE_BYTES)
    assert real.writes == [b"head" + b"x" * COALESCE_BYTES]  # without waiting for the pass to end
    await next_pass()
    assert len(real.writes) == 1  # and nothing twice


async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    real = RecordingTransport()
    guest = CoalescingTransport(real, loop)
    guest.write(b"answer")
    guest.close()
    assert real.writes == [b"answer"] and real.closed

    real = RecordingTransport()
    guest = CoalescingTransport(real, loop)
    guest.write(b"answer")
    guest.abort()
    await next_pass()
    assert real.writes == [] and real.aborted


async def test_writes_to_a_connection_closed_meanwhile_are_dropped() -> None:
    real = RecordingTransport()
    guest = CoalescingTransport(real, asyncio.get_running_loop())
    guest.write(b"late")
    real.close()  # the guest went away before the pass ended
    await next_pass()  # no write after close (RecordingTransport would fail the test)
    assert real.writes == []
    assert guest.is_closing()
    assert guest.get_extra_info("peername") == ("10.1.0.2", 40000)


def test_a_lone_complete_answer_leaves_at_once_not_at_the_end_of_the_pass(tmp_path: Path) -> None:
    """Through a real uvicorn server with GuestProtocol, one request in flight: the app
    answers, then the pass goes on, blocked until the guest has its whole answer. Had the
    answer waited for the end of the pass, the guest would have nothing while it blocks.
    (With other requests in flight it would leave at the end of the pass, with theirs.)"""
    guest_has_it = threading.Event()
    blocked_in_vain: list[bool] = []
    proxy = local_app(tmp_path, "127.0.0.153")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await proxy(scope, receive, send)
        if scope["type"] == "http":
            # The rest of this pass (a log line, metrics) takes its time; generous, not a bound.
            blocked_in_vain.append(not guest_has_it.wait(timeout=10))

    port = free_port()
    server = uvicorn.Server(_uvicorn_config(app, functools.partial(GuestProtocol, GuestSide(proxy))))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [bind_listen(ListenAddress("127.0.0.1", port))]})
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=("127.0.0.153", 0)) as guest:
            guest.sendall(INSTANCE)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += guest.recv(4096)
            guest_has_it.set()
        assert answer.startswith(b"HTTP/1.1 200 ")
        thread_deadline = time.monotonic() + 10
        while not blocked_in_vain and time.monotonic() < thread_deadline:
            time.sleep(0.01)
        assert blocked_in_vain == [False], "the answer waited for the rest of the pass"
    finally:
        guest_has_it.set()
        server.should_exit = True
        thread.join(timeout=10)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_metric_updates_are_applied_together_after_the_batch_delay_and_before_a_scrape() -> None:
    async def test(loop: ManualTimers) -> None:
        metrics = Metrics()
        in_flight = 3
        metrics.watch_in_flight(lambda: in_flight)
        labels = {"vm": "a", "route": "/runtime/", "status": "200"}
        for _ in range(5):
            metrics.count(metrics.requests, "a", "/runtime/", "200")
        metrics.count(metrics.refusals, "rate_limited")
        metrics.observe_upstream(0.002)
        assert [delay for delay, _ in loop.timers] == [batch.DELAY]  # one wait for all seven
        await next_pass()
        assert sample(metrics, "metadata_proxy_requests_total", labels) is None  # not at the end of the pass
        loop.fire()
        assert sample(metrics, "metadata_proxy_requests_total", labels) == 5
        assert sample(metrics, "metadata_proxy_refusals_total", {"code": "rate_limited"}) == 1
        assert sample(metrics, "metadata_proxy_upstream_seconds_count") == 1
        assert sample(metrics, "metadata_proxy_upstream_seconds_bucket", {"le": "0.0025"}) == 1
        assert sample(metrics, "metadata_proxy_in_flight") == 3

        metrics.count(metrics.requests, "a", "/runtime/", "200")
        assert [delay for delay, _ in loop.timers] == [batch.DELAY]  # the next batch waits again
        in_flight = 0
        text = metrics.render().decode()  # a scrape before the wait is over sees every update so far
        assert 'metadata_proxy_requests_total{route="/runtime/",status="200",vm="a"} 6.0' in text
        assert "metadata_proxy_in_flight 0.0" in text
        loop.fire()  # the scheduled apply finds nothing more to do
        assert sample(metrics, "metadata_proxy_requests_total", labels) == 6

    on_manual_timers(test)


async def test_batched_metric_updates_are_applied_on_a_real_loop() -> None:
    metrics = Metrics()
    metrics.count(metrics.cache, "hit")
    await asyncio.sleep(batch.DELAY * 3)  # at least this long: a pause only makes it later
    assert sample(metrics, "metadata_proxy_cache_total", {"result": "hit"}) == 1


def test_metric_updates_outside_a_loop_apply_at_once() -> None:
    metrics = Metrics()
    metrics.count(metrics.cache, "hit")
    assert sample(metrics, "metadata_proxy_cache_total", {"result": "hit"}) == 1


LINE = dict(
    request_id="0123456789abcdef",
    peer="10.1.0.2",
    vm="a",
    vm_id="vm-a",
    method="GET",
    path="/runtime/whoami",
    route="/runtime/",
    status=200,
    code=None,
    duration_ms=1.25,
    upstream_status=200,
    cache="miss",
)


def test_access_log_lines_are_written_together_after_the_batch_delay_as_json_dumps_would() -> None:
    async def test(loop: ManualTimers) -> None:
        out = io.StringIO()
        log = AccessLog(out)
        odd = {"path": '/runtime/"quoted"\\back\u00e9\u2028\x01', "vm": "n\u00e4me", "code": "bad_path"}
        log.write(**LINE)  # type: ignore[arg-type]
        log.write(**{**LINE, **odd, "duration_ms": None, "upstream_status": None})  # type: ignore[arg-type]
        assert [delay for delay, _ in loop.timers] == [batch.DELAY]  # one wait for both lines
        await next_pass()
        assert out.getvalue() == ""  # not at the end of the pass
        loop.fire()
        lines = out.getvalue().splitlines()
        assert len(lines) == 2 and all(line.isascii() for line in lines)
        first, second = (json.loads(line) for line in lines)
        assert {k: first[k] for k in LINE} == LINE
        assert {k: second[k] for k in odd} == odd
        assert second["duration_ms"] is None and second["upstream_status"] is None
        assert list(first) == ["time", *LINE]  # README "Logs"'s fields, in a fixed order
        # Each line exactly as json.dumps writes the same object (ensure_ascii, no spaces).
        assert lines[1] == json.dumps(second, separators=(",", ":"))

        log.write(**LINE)  # type: ignore[arg-type]
        log.flush()  # before the loop stops: at once
        assert len(out.getvalue().splitlines()) == 3
        loop.fire()  # the scheduled flush finds nothing to write
        assert len(out.getvalue().splitlines()) == 3

    on_manual_timers(test)


def test_access_log_lines_outside_a_loop_are_written_at_once() -> None:
    out = io.StringIO()
    AccessLog(out).write(**LINE)  # type: ignore[arg-type]
    assert json.loads(out.getvalue())["request_id"] == LINE["request_id"]


def test_remembered_escapes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped = logs._Escaped()
    monkeypatch.setattr(logs._Escaped, "MAX", 8)
    for i in range(20):
        assert escaped[f'vm-"{i}"'] == json.dumps(f'vm-"{i}"')
        assert len(escaped) <= 8
    assert escaped[None] == "null"
