"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (Python stdlib only).

Chromium started with ``--remote-debugging-pipe`` reads CDP commands from file descriptor 3 and
writes replies and events to descriptor 4, one JSON message per NUL-terminated frame (the
transport Puppeteer's ``pipe: true`` uses). No port, no websocket, nothing to install besides
the browser. Used by the site's browser tests (``test_site_browser.py``).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# where Debian's `chromium` package puts the binary (/usr/bin/chromium is a shell wrapper around it)
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """``$SALBENCH_CHROMIUM``, else the first Chromium/Chrome binary found."""
    env = os.environ.get("SALBENCH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for c in CANDIDATES:
        p = c if os.path.isabs(c) and os.access(c, os.X_OK) else shutil.which(c)
        if p:
            return p
    return None


class CDPError(RuntimeError):
    """The browser answered a command with an error, died, or did not answer in time."""


class Browser:
    """One headless Chromium process; ``page()`` opens a tab. Use as a context manager."""

    def __init__(self, binary: str, *, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="salbench-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds():  # in the child: the pipe ends on descriptors 3 and 4 (dup first: they may be 3/4 already)
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--mute-audio", "--hide-scrollbars",
                "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # the pipes are close-on-exec except the two dup2'd onto 3 and 4
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=fds, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.version = self.call("Browser.getVersion")

    # --------------------------------------------------------------------- transport
    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._id

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise CDPError("the browser did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise CDPError(f"the browser closed its pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        frame, _, self._buf = self._buf.partition(b"\0")
        return json.loads(frame)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to ``events``."""
        i = self._send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._recv(deadline)
            if m.get("id") == i:
                if "error" in m:
                    raise CDPError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str | None = None, timeout: float | None = None,
                   since: int = 0) -> dict:
        """The first event ``method`` (of ``session``) at or after index ``since`` of ``events``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        k = since
        while True:
            while k < len(self.events):
                e = self.events[k]
                k += 1
                if e.get("method") == method and (session is None or e.get("sessionId") == session):
                    return e
            self.events.append(self._recv(deadline))

    def page(self, width: int = 1280, height: int = 900) -> "Page":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session, width, height)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """A tab: navigate, evaluate, click like a user, screenshot; collects console errors,
    uncaught exceptions, browser log errors (e.g. a resource that failed to load) and the URL of
    every network request."""

    def __init__(self, browser: Browser, session: str, width: int, height: int):
        self.b, self.s = browser, session
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.b.call(f"{domain}.enable", session=session)
        self.b.call("Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self._start = len(self.b.events)

    def _mine(self, method: str) -> list[dict]:
        return [e["params"] for e in self.b.events[self._start:]
                if e.get("sessionId") == self.s and e.get("method") == method]

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event (every image and script loaded or failed)."""
        self._start = len(self.b.events)
        res = self.b.call("Page.navigate", {"url": url}, session=self.s)
        if res.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {res['errorText']}")
        self.b.wait_event("Page.loadEventFired", session=self.s, since=self._start)

    def eval(self, expression: str):
        res = self.b.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                          session=self.s)
        if "exceptionDetails" in res:
            raise CDPError(f"{expression[:80]!r} threw: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the element ``selector``."""
        box = self.eval(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        if box is None:
            raise CDPError(f"no element matches {selector!r}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            params = {"type": kind, "x": x, "y": y}
            if kind != "mouseMoved":
                params.update(button="left", clickCount=1)
            self.b.call("Input.dispatchMouseEvent", params, session=self.s)

    def errors(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and log errors since the last ``goto``."""
        out = [f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
               for p in self._mine("Runtime.consoleAPICalled") if p["type"] in ("error", "warning", "assert")]
        out += [f"exception: {p['exceptionDetails'].get('exception', {}).get('description') or p['exceptionDetails'].get('text')}"
                for p in self._mine("Runtime.exceptionThrown")]
        out += [f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}"
                for p in self._mine("Log.entryAdded") if p["entry"]["level"] in ("error", "warning")]
        return out

    def requests(self) -> list[str]:
        """URLs the page requested since the last ``goto``."""
        return [p["request"]["url"] for p in self._mine("Network.requestWillBeSent")]

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            w, h = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        data = self.b.call("Page.captureScreenshot", params, session=self.s)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
