"""Check a built docs site: internal links resolve, and in headless Chromium every page loads
without console errors, search finds ``fit``; screenshots of the home page and one API page.

Run after a build (Debian's ``chromium`` package must be installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python docs/check_site.py docs/_build/html --screenshots docs/screenshots

The links are checked in Python on the HTML files (every ``href`` into the site names an
existing file and, with a ``#fragment``, an ``id`` in it). The browser part serves the site over
HTTP on 127.0.0.1, drives Chromium through the DevTools protocol (tornado's websocket client)
and records, per page, uncaught exceptions, ``console.error`` calls, log entries of level
``error`` (a resource that failed to load) and failed requests. Prints a JSON report; exits 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse
from urllib.request import urlopen

#: Chromium flags: no GPU, no network beyond the local server, no first-run work
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--hide-scrollbars",
]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key == "id" and value:
                self.ids.add(value)
            if key == "name" and tag == "a" and value:
                self.ids.add(value)
            if key == "href" and tag == "a" and value:
                self.hrefs.append(value)


def check_links(root: Path) -> list[str]:
    """Every internal link of every page under ``root``: its file exists, its anchor too.

    :returns: one line per broken link (empty when all resolve).
    """
    parsed: dict[Path, _Links] = {}

    def parse(path: Path) -> _Links:
        if path not in parsed:
            parser = _Links()
            parser.feed(path.read_text(errors="replace"))
            parsed[path] = parser
        return parsed[path]

    broken = []
    for page in sorted(root.rglob("*.html")):
        for href in parse(page).hrefs:
            url = urlparse(href)
            if url.scheme or url.netloc or href.startswith("mailto:"):
                continue  # external: not this check's job
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(root)}: {href} (no file)")
                continue
            if url.fragment and target.suffix == ".html":
                if unquote(url.fragment) not in parse(target).ids:
                    broken.append(f"{page.relative_to(root)}: {href} (no id)")
    return broken


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # noqa: D102 - silence the request log
        pass


class _Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws: object) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.write_message(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self.ws.read_message(), 60)
            if message is None:
                raise RuntimeError("the DevTools connection closed")
            data = json.loads(message)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            if "method" in data:
                self.events.append(data)

    async def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(self.ws.read_message(), left)
            except asyncio.TimeoutError:
                return
            if message is None:
                return
            data = json.loads(message)
            if "method" in data:
                self.events.append(data)

    async def load(self, url: str, timeout: float = 30.0) -> None:
        self.events.clear()
        await self.call("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > end:
                raise RuntimeError(f"{url} did not load in {timeout} s")
            await self.drain(0.2)
        await self.drain(0.5)  # late scripts (search index, theme) report here

    def errors(self) -> list[str]:
        found = []
        requests = {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        }
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                found.append(f"exception: {text}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                args = [str(a.get("value", a.get("description", ""))) for a in params["args"]]
                found.append("console.error: " + " ".join(args))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                if entry.get("url", "").endswith("/favicon.ico"):
                    continue  # the browser asks for it by itself; the site links none
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                url = requests.get(params.get("requestId"), "")
                found.append(f"request failed: {params.get('errorText')} {url}".strip())
        return found

    async def evaluate(self, expression: str) -> object:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def screenshot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))


async def _browse(base: str, pages: list[str], port: int, shots: Path | None) -> dict:
    from tornado.websocket import websocket_connect

    with urlopen(f"http://127.0.0.1:{port}/json/list") as response:
        targets = [t for t in json.load(response) if t.get("type") == "page"]
    ws = await websocket_connect(targets[0]["webSocketDebuggerUrl"], max_message_size=2**28)
    page = _Page(ws)
    for domain in ("Page", "Runtime", "Log", "Network"):
        await page.call(f"{domain}.enable")
    await page.call(
        "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
        mobile=False,
    )  # fmt: skip
    report: dict = {"pages": {}, "search": {}}
    for rel in pages:
        await page.load(urljoin(base, rel))
        title = await page.evaluate("document.title")
        report["pages"][rel] = {"title": title, "errors": page.errors()}
    # search: Sphinx's own search page, the query "fit"
    await page.load(urljoin(base, "search.html?q=fit"))
    hits: list = []
    end = time.monotonic() + 30
    while time.monotonic() < end:
        hits = await page.evaluate(
            "Array.from(document.querySelectorAll('#search-results li a'))"
            ".map(a => a.getAttribute('href'))"
        )
        if hits:
            break
        await page.drain(0.5)
    report["search"] = {"query": "fit", "hits": len(hits or []), "first": (hits or [])[:10]}
    report["search"]["errors"] = page.errors()
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
        for rel, name in (("index.html", "home.png"), ("api/train.html", "api_train.png")):
            await page.load(urljoin(base, rel))
            await page.screenshot(shots / name)
        report["screenshots"] = sorted(str(p) for p in shots.glob("*.png"))
    ws.close()
    return report


def check_site(
    root: Path,
    screenshots: Path | None = None,
    chromium: str = "chromium",
    only: list[str] | None = None,
) -> dict:
    """Check the site built in ``root``; see the module docstring. Returns the report.

    :param screenshots: a folder for ``home.png`` and ``api_train.png`` (none if not given).
    :param only: the pages to open (paths relative to ``root``; default: every page).
    """
    root = Path(root).resolve()
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "chromium": version.strip(),
        "broken_links": check_links(root),
    }
    pages = sorted(str(p.relative_to(root)) for p in root.rglob("*.html"))
    pages = [p for p in pages if not p.startswith(("_modules/", "_static/"))]
    if only is not None:
        pages = [p for p in pages if p in only]
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    profile = Path(tempfile.mkdtemp(prefix="pyro_lvm_chromium_"))
    browser = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}"]
        + ["about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > end or browser.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools server")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        report.update(asyncio.run(_browse(base, pages, port, screenshots)))
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    report["pages_with_errors"] = {
        p: r["errors"] for p, r in report["pages"].items() if r["errors"]
    }
    report["ok"] = not (
        report["broken_links"]
        or report["pages_with_errors"]
        or report["search"]["errors"]
        or report["search"]["hits"] == 0
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built HTML folder")
    parser.add_argument("--screenshots", type=Path, default=None)
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args(argv)
    report = check_site(args.site, args.screenshots, args.chromium)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
