"""The dashboard (GET /) in headless Chromium against the real daemon, driven over the DevTools protocol.

Chromium is Debian's `chromium` ($CHROMIUM names another binary); scripts/bootstrap.sh installs it when it runs as
root with apt-get. Without it these tests skip. The DevTools protocol is spoken over aiohttp's websocket client, on
the test's own event loop, beside the in-process daemon: no extra dependency and no browser download.

MODEL_SUPERVISOR_DASHBOARD_SCREENSHOT=docs/dashboard.png also saves screenshots (two models, one ready, a lease, a
swap timeline): that file at 1280 px, and docs/dashboard-420.png beside it at 420 px wide.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from model_supervisor.records import RequestRecord

pytestmark = pytest.mark.llama

SWAP_GROUP = {"main": {"swap": True, "exclusive": True}}
TOKEN = "admin-secret"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "--window-size=1280,960",
]  # fmt: skip


def chromium_binary() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def two_models(tiny_models) -> dict[str, dict]:
    return {
        "a": {"model": str(tiny_models[1]), "group": "main", "args": ["-c", "512"], "aliases": ["speed"], "ttl_s": 600},
        "b": {"model": str(tiny_models[2]), "group": "main", "args": ["-c", "512"]},
    }


class Page:
    """One Chromium tab over the DevTools protocol: evaluate, wait for a condition, click, type, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.errors: list[str] = []  # uncaught exceptions and console.error calls: the page must have none
        self.events: list[dict[str, Any]] = []  # every other DevTools event, in order
        self._event = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details.get("text", "?"))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in data["params"]["args"]))
            elif "method" in data:
                self.events.append(data)
                self._event.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
        return reply["result"]

    async def event(self, method: str, timeout: float = 20) -> dict[str, Any]:
        """The params of the first `method` event not yet taken, waiting up to `timeout` s for one."""
        async with asyncio.timeout(timeout):
            while True:
                for i, event in enumerate(self.events):
                    if event["method"] == method:
                        return self.events.pop(i)["params"]
                self._event.clear()
                await self._event.wait()

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    async def text(self, selector: str) -> str | None:
        return await self.eval(f"document.querySelector({json.dumps(selector)})?.textContent.trim() ?? null")

    async def wait_for(self, expression: str, what: str = "", timeout: float = 20) -> Any:
        """Evaluate until truthy, every 50 ms for at most `timeout` s; a timeout shows what the page shows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if loop.time() > deadline:
                shown = await self.eval("document.body.innerText")
                raise AssertionError(f"waited {timeout} s for {what or expression}\npage:\n{shown[:3000]}\n"
                                     f"JS errors: {self.errors}")
            await asyncio.sleep(0.05)

    async def wait_for_text(self, selector: str, expected: str, timeout: float = 20) -> None:
        expression = f"document.querySelector({json.dumps(selector)})?.textContent.trim() === {json.dumps(expected)}"
        await self.wait_for(expression, f"{selector} to read {expected!r}", timeout)

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the element's centre, as a user would; once the element is
        what is under that point. An /events update that re-renders the page between finding the point and the
        release can move the element (a table column widens) so that no click happens: then it is clicked again,
        as a user would (never twice: only when the element saw no click)."""
        target = json.dumps(selector)
        for _ in range(5):
            centre = await self.wait_for(f"""(() => {{
                const e = document.querySelector({target});
                if (!e || !e.offsetParent) return null;
                e.scrollIntoView({{block: "center"}});
                const r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
                if (!e.contains(document.elementFromPoint(x, y))) return null;
                window.__clicked = false;
                e.addEventListener("click", () => {{ window.__clicked = true; }}, {{once: true, capture: true}});
                return [x, y];
            }})()""", f"a visible {selector} to click", timeout=10)
            for kind in ("mousePressed", "mouseReleased"):
                await self.send("Input.dispatchMouseEvent", type=kind, x=centre[0], y=centre[1], button="left",
                                clickCount=1)
            if await self.eval("window.__clicked"):
                return
        raise AssertionError(f"{selector} was under the pointer but never got the click")

    async def type(self, selector: str, text: str) -> None:
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def set_width(self, width: int, height: int = 960) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.wait_for(f"window.innerWidth === {width}", f"the page at {width} px")

    async def screenshot(self, path: pathlib.Path, width: int = 1280) -> None:
        await self.set_width(width)
        height = await self.eval("Math.ceil(document.documentElement.scrollHeight)")
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        await self.send("Emulation.clearDeviceMetricsOverride")


@pytest.fixture
async def chromium(start_daemon, tmp_path) -> AsyncIterator[Callable[[str], Awaitable[Page]]]:
    """open(url) -> Page in a fresh headless Chromium. Requests start_daemon so the browser (and its /events
    connection) goes before the daemon stops."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium: apt-get install chromium (scripts/bootstrap.sh does it when run as root), "
                    "or set $CHROMIUM")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log_path = tmp_path / "chromium.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True)
    http = aiohttp.ClientSession()
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    async def devtools_port() -> int:
        port_file = profile / "DevToolsActivePort"  # Chromium writes it once it listens
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            if process.returncode is not None:
                pytest.fail(f"chromium exited with {process.returncode} at start:\n{log_tail()}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(port_file.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        pytest.fail(f"chromium did not open its DevTools port within 30 s:\n{log_tail()}")

    async def open_page(url: str) -> Page:
        port = await devtools_port()
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        target = next(t for t in targets if t["type"] == "page")
        ws = await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        sockets.append(ws)
        page = Page(ws)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        await page.send("Page.navigate", url=url)
        await page.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", "the page to load")
        return page

    try:
        yield open_page
    finally:
        for ws in sockets:
            await ws.close()
        await http.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def open_dashboard(chromium, d) -> Page:
    page = await chromium(d.url + "/")
    await page.wait_for("document.querySelector('#connection').dataset.state === 'live'", "the /events stream")
    await page.wait_for("document.querySelectorAll('#models tr[data-model]').length === 2", "both models")
    return page


async def check_usage(page: Page, d) -> dict[str, Any] | None:
    """The page shows /usage's figures, or 'no usage data' while /usage answers an error. Returns the figures."""
    await page.eval("loadUsage()")  # what the page does every 30 s, now
    async with d.http.get(f"{d.url}/usage?days=7") as response:
        status, usage = response.status, await response.json()
    if status != 200:
        assert await page.eval("document.querySelector('#usage').classList.contains('empty-usage')")
        assert (await page.eval("document.querySelector('#usage-empty').innerText")).startswith("no usage data")
        return None
    assert not await page.eval("document.querySelector('#usage').classList.contains('empty-usage')")
    assert await page.text("#saved-usd") == f"${usage['saved_usd']:.2f}"
    assert await page.text("#usage-requests") == f"{usage['requests']:,}"
    bars = await page.eval("[...document.querySelectorAll('#usage-chart g[data-date]')]"
                           ".map(g => [g.dataset.date, +g.dataset.local, +g.dataset.cloud])")
    assert len(bars) == 7
    assert {date: (local, cloud) for date, local, cloud in bars} == {
        day["date"]: (day["local"], day["cloud"]) for day in usage["daily"]}
    return usage


async def token_prompt_shown(page: Page) -> None:
    await page.wait_for("document.querySelector('#token-form').classList.contains('shown')", "the token prompt")


async def open_logs(page: Page, d, model: str, token: str | None = None) -> None:
    """The model's logs button opens the dialog with what GET /logs/{model} answers."""
    await page.wait_for("document.querySelector('#logs-dialog').open", f"{model}'s logs")
    assert await page.text("#logs-title") == f"{model}: llama-server output"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with d.http.get(f"{d.url}/logs/{model}", headers=headers) as response:
        assert response.status == 200
        lines = (await response.text()).strip().splitlines()
    assert lines, f"{model} printed nothing"
    shown = await page.eval("document.querySelector('#logs-text').textContent")
    assert lines[0] in shown and "llama" in shown  # llama-server's own output
    await page.click("#logs-close")
    await page.wait_for("!document.querySelector('#logs-dialog').open", "the logs to close")


async def check_narrow_layout(page: Page, width: int = 420) -> None:
    """At `width` px nothing is wider than the window: the models' table is one block per model, other tables
    scroll inside their card, and every button is on screen."""
    await page.set_width(width)
    assert await page.eval("document.documentElement.scrollWidth") <= width
    assert await page.eval("getComputedStyle(document.querySelector('#models thead')).display") == "none"
    outside = await page.eval(f"""[...document.querySelectorAll('body *')]
        .filter(e => !e.closest('.scroll') && !e.closest('dialog') && e.getBoundingClientRect().right > {width} + 0.5)
        .map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className)""")
    assert outside == [], outside
    buttons = await page.eval("[...document.querySelectorAll('button')].filter(b => b.offsetParent)"
                              ".map(b => b.getBoundingClientRect().right)")
    assert buttons and max(buttons) <= width
    await page.send("Emulation.clearDeviceMetricsOverride")


def seed_history(d) -> None:
    """Six earlier days of requests in the ledger, for the screenshot (through the ledger's own writer)."""
    now = time.time()
    for days_ago, (local, cloud, rejected) in enumerate([(41, 9, 1), (37, 14, 0), (52, 6, 2), (12, 3, 0),
                                                         (8, 1, 0), (46, 11, 1)], start=1):
        for route, count in (("local", local), ("cloud", cloud), ("rejected", rejected)):
            for _ in range(count):
                d.daemon.ledger.record(RequestRecord(
                    started_at=now - days_ago * 86400, requested="a", model="a",
                    provider="openai" if route == "cloud" else "local", route=route,
                    endpoint="/v1/chat/completions", status=503 if route == "rejected" else 200,
                    fallback_reason="loading" if route == "cloud" else None,
                    tokens_in=None if route == "rejected" else 1800, tokens_out=None if route == "rejected" else 450,
                    wait_ms=5.0, ttft_ms=None if route == "rejected" else 180.0, total_ms=2400.0))


async def test_dashboard_follows_the_daemon_and_asks_for_the_admin_token(start_daemon, tiny_models, chromium,
                                                                         monkeypatch, tmp_path):
    monkeypatch.setenv("MS_TEST_ADMIN", TOKEN)
    (tmp_path / "not-a-folder").write_text("")  # an unusable state_dir: no ledger, /usage answers 503
    d = await start_daemon(two_models(tiny_models), SWAP_GROUP, admin_token_env="MS_TEST_ADMIN",
                           state_dir=str(tmp_path / "not-a-folder" / "state"))
    page = await open_dashboard(chromium, d)
    assert await check_usage(page, d) is None  # "no usage data", and the rest of the page works
    assert await page.text('[data-model="a"] .state') == "unloaded"
    assert await page.text('[data-model="b"] .state') == "unloaded"
    assert await page.text('[data-model="a"] .aliases') == "speed"
    assert await page.text("#gaming-state") == "off"

    # A request loads a: the page follows through /events, without a reload.
    assert (await d.chat("a"))[0] == 200
    await page.wait_for_text('[data-model="a"] .state', "ready")
    assert await page.text('[data-model="a"] .route') == "local"
    assert (await page.text('[data-model="a"] .last-load')).endswith(" s")
    assert await page.eval("parseFloat(document.querySelector('[data-seg=\"models\"]').style.width) > 0")

    # The switch: the daemon answers 401, the page asks for the token; a wrong one is refused, the right one sent.
    await page.click("#gaming-toggle")
    await page.wait_for("document.querySelector('#token-form').classList.contains('shown')", "the token prompt")
    await page.type("#token-input", "wrong")
    await page.click("#token-save")
    await page.wait_for_text("#token-message", "token rejected")
    assert not d.runtime.gaming
    await page.type("#token-input", TOKEN)
    await page.click("#token-save")
    await d.wait_until(lambda: d.runtime.gaming)
    await page.wait_for_text("#gaming-state", "on")
    assert await page.eval("document.querySelector('#gaming-toggle').getAttribute('aria-checked')") == "true"
    await page.wait_for_text('[data-model="a"] .state', "unloaded")  # gaming mode stopped a
    assert await page.eval("localStorage.getItem('model-supervisor.admin-token')") == TOKEN

    # Flipped through the API: the page follows.
    async with d.http.post(f"{d.url}/gaming-mode", json={"enabled": False},
                           headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
    await page.wait_for_text("#gaming-state", "off")

    # The stored token goes with the next click at once: no prompt.
    await page.click("#gaming-toggle")
    await d.wait_until(lambda: d.runtime.gaming)
    await page.wait_for_text("#gaming-state", "on")
    assert not await page.eval("document.querySelector('#token-form').classList.contains('shown')")

    # Load, unload and logs are admin requests too: without a stored token the page asks for it first, then does
    # what was clicked; with one, at once.
    async with d.http.post(f"{d.url}/gaming-mode", json={"enabled": False},
                           headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
    await page.wait_for_text("#gaming-state", "off")
    await page.eval("localStorage.removeItem('model-supervisor.admin-token')")
    await page.click('[data-model="b"] button[data-action="load"]')
    await token_prompt_shown(page)
    assert d.state("b") == "unloaded"
    await page.type("#token-input", TOKEN)
    await page.click("#token-save")
    await page.wait_for_text('[data-model="b"] .state', "ready")
    assert await page.eval('document.querySelector(\'[data-model="b"] button[data-action="load"]\').disabled')
    await page.click('[data-model="b"] button[data-action="unload"]')
    await page.wait_for_text('[data-model="b"] .state', "unloaded")
    assert d.state("b") == "unloaded"
    assert not await page.eval("document.querySelector('#token-form').classList.contains('shown')")
    await page.eval("localStorage.removeItem('model-supervisor.admin-token')")
    await page.click('[data-model="b"] button[data-action="logs"]')
    await token_prompt_shown(page)
    await page.type("#token-input", TOKEN)
    await page.click("#token-save")
    await open_logs(page, d, "b", TOKEN)
    assert await page.text("#action-error") == ""
    assert page.errors == []


async def test_dashboard_without_a_token_shows_leases_usage_and_a_lost_connection(start_daemon, tiny_models,
                                                                                 chromium, monkeypatch):
    monkeypatch.delenv("MODEL_SUPERVISOR_ADMIN_TOKEN", raising=False)
    # A priced cloud target values the local requests (nothing is sent to it: no model falls back to it).
    cloud = {"openai": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o", "input_usd_per_mtok": 2.5,
                        "output_usd_per_mtok": 10}}
    d = await start_daemon(two_models(tiny_models), SWAP_GROUP, cloud=cloud)
    screenshot = os.environ.get("MODEL_SUPERVISOR_DASHBOARD_SCREENSHOT")
    if screenshot:
        seed_history(d)
    page = await open_dashboard(chromium, d)
    for _ in range(3):
        assert (await d.chat("a", max_tokens=16))[0] == 200
    status, lease = await d.post_json("/leases", {"owner": "tts", "vram_mb": 300, "ttl_s": 600})
    assert status == 201
    await page.wait_for_text('[data-model="a"] .state', "ready")
    await page.wait_for_text(f'[data-lease="{lease["id"]}"] .owner', "tts")
    assert await page.eval("parseFloat(document.querySelector('[data-seg=\"leases\"]').style.width) > 0")
    assert "300 MB" in await page.text('[data-legend="leases"]')
    usage = await check_usage(page, d)
    assert usage is not None and usage["local"] >= 3 and usage["saved_usd"] > 0

    # Latency: the median time to first token (and tokens per second, from a streamed answer) of a's requests.
    body = {"model": "a", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 24, "stream": True,
            "stream_options": {"include_usage": True}}
    async with d.http.post(f"{d.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200 and "[DONE]" in await response.text()
    await page.wait_for("document.querySelector('[data-model=\"a\"] .ttft')?.textContent.endsWith(' TTFT')",
                        "a's latency")
    latency = (await d.get_json("/status"))[1]["models"]["a"]["latency"]
    assert latency["requests"] >= 4 and latency["ttft_p50_ms"] > 0
    assert re.fullmatch(r"[\d.]+ m?s TTFT", await page.text('[data-model="a"] .ttft'))
    # (None when the whole stream came in one read, as with these tiny models it may)
    assert re.fullmatch(r"(–|[\d.]+) tok/s", await page.text('[data-model="a"] .tps'))

    # The load button: b swaps a out. The timeline shows the swap, its cause and how long it took.
    await page.click('[data-model="b"] button[data-action="load"]')
    await page.wait_for_text('[data-model="b"] .state', "ready")
    await page.wait_for_text('[data-model="a"] .state', "unloaded")
    assert not await page.eval("document.querySelector('#token-form').classList.contains('shown')")
    swap = await page.wait_for("""(() => {
        const row = document.querySelector('#timeline tr[data-model="b"][data-swap]');
        return row && ['.t-event', '.t-cause', '.t-ms'].map(c => row.querySelector(c).textContent); })()""",
                               "the swap in the timeline")
    assert swap[0] == "swapped in" and swap[1] == "admin · swapped out a", swap
    assert re.fullmatch(r"[\d.]+ m?s \(swap [\d.]+ m?s\)", swap[2]), swap
    unloaded = await page.eval("""[...document.querySelectorAll('#timeline tr[data-event="unloaded"]')]
        .map(r => [r.querySelector('.t-model').textContent, r.querySelector('.t-cause').textContent])""")
    assert ["a", "swap"] in unloaded
    timeline = (await d.get_json("/status"))[1]["timeline"]
    assert await page.eval("document.querySelectorAll('#timeline tbody tr').length") == min(len(timeline), 12)
    # A request for a swaps b out again (for the picture: two swaps, a ready with its latency).
    assert (await d.chat("a", max_tokens=16))[0] == 200
    await page.wait_for_text('[data-model="a"] .state', "ready")
    await page.wait_for("document.querySelectorAll('#timeline tr[data-swap]').length === 2", "the second swap")

    # While a model loads: a progress bar (by its last load's time; a sweep when it was never loaded), and a model
    # draining to be swapped out reads "draining", with why, never a plain "ready". The documents are set in the
    # page directly, in one synchronous step (a real load of these tiny models is over before a look).
    shown = await page.eval("""(() => {
        const real = status, a = () => document.querySelector('[data-model="a"]');
        const b = () => document.querySelector('[data-model="b"]');
        status = JSON.parse(JSON.stringify(real));
        Object.assign(status.models.a, {state: "loading", load_progress: 0.4, eta_ms: 600, waiting_for: "loading",
                                        load_progress_basis: "its last load took 1000 ms"});
        Object.assign(status.models.b, {state: "ready", route: "local",
                                        waiting_for: "draining: to be swapped out for a once 1 request(s) finish"});
        receivedAt = performance.now();
        render();
        const out = {bar: !a().querySelector('.progress').hidden,
                     progress: +a().querySelector('.progress').dataset.progress,
                     text: a().querySelector('.progress-text').textContent,
                     state: b().querySelector('.state').textContent, why: b().querySelector('.why').textContent,
                     route: b().querySelector('.route').textContent};
        Object.assign(status.models.a, {load_progress: null, eta_ms: null,
                                        load_progress_basis: "never loaded before: no estimate"});
        render();
        out.unknown = a().querySelector('.progress').dataset.progress;
        out.unknownText = a().querySelector('.progress-text').textContent;
        status = real;
        render();
        out.after = [a().querySelector('.state').textContent, a().querySelector('.progress').hidden];
        return out; })()""")
    assert shown["bar"] and 0.4 <= shown["progress"] < 0.5 and shown["text"].startswith("4"), shown
    assert "ready in about" in shown["text"], shown
    assert shown["state"] == "draining" and shown["why"].startswith("draining: to be swapped out for a"), shown
    assert shown["route"] == "local until swapped out", shown
    assert shown["unknown"] == "unknown" and shown["unknownText"] == "never loaded before: no estimate", shown
    assert shown["after"] == ["ready", True], shown

    if screenshot:
        await page.screenshot(pathlib.Path(screenshot))
        await page.screenshot(pathlib.Path(screenshot).with_name("dashboard-420.png"), width=420)
    await check_narrow_layout(page)

    # Unload from the page, and "unload all"; a's logs are a click away (no token configured: no prompt).
    await page.click('[data-model="a"] button[data-action="unload"]')
    await page.wait_for_text('[data-model="a"] .state', "unloaded")
    await page.click('[data-model="b"] button[data-action="load"]')
    await page.wait_for_text('[data-model="b"] .state', "ready")
    await page.click("#unload-all")
    await page.wait_for_text('[data-model="b"] .state', "unloaded")
    assert d.state("a") == d.state("b") == "unloaded"
    await page.click('[data-model="a"] button[data-action="logs"]')
    await open_logs(page, d, "a")
    assert await page.text("#action-error") == ""

    # No token configured: the switch works at once, both ways, and the page shows the daemon's state.
    await page.click("#gaming-toggle")
    await d.wait_until(lambda: d.runtime.gaming)
    await page.wait_for_text("#gaming-state", "on")
    await page.click("#gaming-toggle")
    await d.wait_until(lambda: not d.runtime.gaming)
    await page.wait_for_text("#gaming-state", "off")
    assert (await d.post_json("/gaming-mode", {"enabled": True}))[0] == 200
    await page.wait_for_text("#gaming-state", "on")
    assert not await page.eval("document.querySelector('#token-form').classList.contains('shown')")

    # The daemon drops every connection, and the browser's reconnection is held (DevTools' Fetch domain pauses
    # it): the page says the connection is lost. Once the reconnection goes through it is live again, and shows
    # what changed meanwhile.
    await page.send("Fetch.enable", patterns=[{"urlPattern": "*/events*", "requestStage": "Request"}])
    for connection in d.daemon.runner.server.connections:
        connection.force_close()
    paused = await page.event("Fetch.requestPaused")
    await page.wait_for("document.querySelector('#connection').dataset.state === 'lost'", "'connection lost'")
    assert await page.eval("getComputedStyle(document.querySelector('#lost-banner')).display") == "block"
    assert (await d.post_json("/gaming-mode", {"enabled": False}))[0] == 200
    assert await page.text("#gaming-state") == "on"  # the last state received
    await page.send("Fetch.continueRequest", requestId=paused["requestId"])
    await page.send("Fetch.disable")
    await page.wait_for("document.querySelector('#connection').dataset.state === 'live'", "the page to reconnect")
    await page.wait_for_text("#gaming-state", "off")
    assert page.errors == []
