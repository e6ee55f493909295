"""A minimal headless-Chromium driver over the DevTools protocol (for tests).

Launches Debian's ``chromium`` with ``--remote-debugging-port=0``, reads the
port from ``DevToolsActivePort``, and speaks CDP over trio-websocket: open a
page, evaluate JavaScript in it (awaiting promises), poll until an
expression is true. Nothing else: no downloads, no extra packages.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio_websocket


def chromium_path() -> str | None:
    """The browser executable, or ``None`` when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(Exception):
    """The browser answered a command with an error, or a script threw."""


class Browser:
    def __init__(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        nursery.start_soon(self._read)

    async def _read(self) -> None:
        while True:
            try:
                message = json.loads(await self._ws.get_message())
            except trio_websocket.ConnectionClosed:
                return
            waiter = self._waiting.pop(message.get("id", -1), None)
            if waiter is not None:
                waiter.send_nowait(message)

    async def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[id] = send
        message: dict[str, Any] = {"id": id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_message(json.dumps(message))
        answer = await receive.receive()
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def new_page(self, url: str) -> Page:
        target = await self.call("Target.createTarget", {"url": url})
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        return Page(self, attached["sessionId"])


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self._browser = browser
        self._session = session

    async def evaluate(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (awaiting a promise) and return its JSON value."""
        result = await self._browser.call(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, self._session
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout: float = 10.0, poll: float = 0.05) -> Any:  # noqa: ASYNC109 (a test helper)
        """Poll until ``expression`` is truthy; return its value."""
        with trio.fail_after(timeout):
            while True:
                try:
                    # A DOM node is not JSON: test truthiness in the page, then fetch the value.
                    value = await self.evaluate(f"(() => {{ const v = ({expression}); return v ? (v instanceof Node ? true : v) : v; }})()")
                except CDPError:
                    value = None  # the page may still be loading
                if value:
                    return value
                await trio.sleep(poll)


@asynccontextmanager
async def open_browser(executable: str) -> AsyncIterator[Browser]:
    """Run a headless browser for the duration of the block."""
    profile = Path(tempfile.mkdtemp(prefix="ensemble-browser-"))
    args = [
        executable,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    process = await trio.lowlevel.open_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        active = profile / "DevToolsActivePort"
        with trio.fail_after(30):
            while not active.exists() or len(active.read_text().splitlines()) < 2:  # noqa: ASYNC110 (polling a file)
                await trio.sleep(0.05)
        port, path = active.read_text().splitlines()[:2]
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.connect_websocket_url(nursery, f"ws://127.0.0.1:{port}{path}", max_message_size=64 * 1024 * 1024)
            try:
                yield Browser(ws, nursery)
            finally:
                await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        process.terminate()
        with trio.move_on_after(5) as waited:
            waited.shield = True
            await process.wait()
        if process.returncode is None:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)
