"""The web dashboard (node/dashboard.py, node/static/).

Three levels: the login table as plain calls with time passed in; the HTTP side
(login, cookie, the admin reads the dashboard adds) against a real 3-node
cluster; and the page itself in headless Chromium, driven over the DevTools
protocol with aiohttp's WebSocket client. Chromium runs with a private profile
under the test's tmp dir, calls nothing outside 127.0.0.1, and is stopped by PID
whatever the outcome. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from node.client import Client
from node.dashboard import COOKIE_NAME, Logins, token_matches, with_lag
from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DOC = ROOT / "docs" / "dashboard.png"
HTTP_TIMEOUT_S = 5
APPLY_WAIT_S = 10
POLL_INTERVAL_S = 0.1
BROWSER_START_S = 20
PAGE_WAIT_S = 30
DEVTOOLS_REPLY_S = 10
DEVTOOLS_FRAMES_PER_CALL_MAX = 1000  # events skipped while waiting for one reply
BROWSER_STOP_S = 5
TRAFFIC_EVENTS_MAX = 400
TRAFFIC_INTERVAL_S = 0.1
RECORD_WAIT_S = 2
CHART_POINTS_SHOWN = 5  # polls 2 s apart: about 10 s of traffic
VIEWPORT = {"width": 1280, "height": 900}
PR_SET_PDEATHSIG = 1

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-crash-reporter", "--disable-breakpad",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- logins: the core, time passed in ------------------------------------------------


def test_login_is_valid_until_its_ttl_passes():
    logins = Logins(ttl_ms=1000, logins_max=10)
    sid = logins.open(now=5000)

    assert logins.valid(sid, 5999)
    assert not logins.valid(sid, 6000)
    assert not logins.valid(sid, 5001)  # forgotten once seen expired


def test_oldest_login_is_dropped_when_the_table_is_full():
    logins = Logins(ttl_ms=10_000, logins_max=2)
    first, second, third = (logins.open(now=t) for t in (1, 2, 3))

    assert not logins.valid(first, 4)
    assert logins.valid(second, 4) and logins.valid(third, 4)
    assert logins.statistics().dropped_total == 1
    assert logins.statistics().open == 2


def test_expired_logins_are_forgotten_before_any_is_dropped():
    logins = Logins(ttl_ms=10, logins_max=2)
    logins.open(now=0)
    logins.open(now=1)
    fresh = logins.open(now=100)

    assert logins.valid(fresh, 101)
    assert logins.statistics().dropped_total == 0
    assert logins.statistics().open == 1


def test_closed_login_and_unknown_ids_are_not_valid():
    logins = Logins()
    sid = logins.open(now=0)
    logins.close(sid)

    assert not logins.valid(sid, 1)
    assert not logins.valid("made-up", 1)
    assert not logins.valid(None, 1)


def test_token_matches_only_the_exact_token_and_never_an_empty_one():
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cre", "s3cret")
    assert not token_matches("", "")
    assert not token_matches("anything", "")
    # Header bytes that are not UTF-8 arrive as surrogate escapes: a plain no.
    assert not token_matches("\udcff\udcfe", "s3cret")


def test_lag_counts_entries_behind_the_leaders_commit_index():
    rows = [{"id": "n1", "status": {"commit_index": 10, "applied_index": 10}},
            {"id": "n2", "status": {"commit_index": 9, "applied_index": 7}},
            {"id": "n3", "status": None}]
    lags = {r["id"]: r["lag_entries"] for r in with_lag(rows, "n1")}

    assert lags == {"n1": 0, "n2": 3, "n3": None}


# -- HTTP: login, cookie, the dashboard's admin reads ---------------------------------


async def login(url: str, token: str) -> tuple[aiohttp.ClientResponse, str]:
    """POST /login; the response and the page text."""
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/login", data={"token": token},
                             allow_redirects=False, timeout=_timeout()) as response:
            return response, await response.text()


async def get(url: str, path: str, cookie: str | None = None) -> tuple[int, str]:
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}"} if cookie else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + path, headers=headers, allow_redirects=False,
                            timeout=_timeout()) as response:
            return response.status, await response.text()


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)


async def test_admin_status_without_credential_is_401(cluster: Cluster):
    url = cluster.admin_url("n1")

    status, body = await get(url, "/admin/status")
    assert status == 401
    assert json.loads(body)["error"] == "UNAUTHORIZED"

    status, _ = await get(url, "/admin/status", cookie="not-a-session")
    assert status == 401

    # The scheme is case-insensitive; the token is not.
    async with aiohttp.ClientSession() as http:
        for header, want in ((f"bearer {cluster.admin_token}", 200),
                             (f"BEARER {cluster.admin_token}", 200),
                             (f"bearer {cluster.admin_token.upper()}x", 401)):
            async with http.get(url + "/admin/status", timeout=_timeout(),
                                headers={"Authorization": header}) as response:
                assert response.status == want, header

    # A token that is not text was a 500 with a traceback (breaker run, finding 7).
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /admin/status HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    status_line = await asyncio.wait_for(reader.readline(), HTTP_TIMEOUT_S)
    writer.close()
    assert status_line.split()[1] == b"401", status_line


async def test_wrong_token_login_is_401_with_the_login_page(cluster: Cluster):
    response, page = await login(cluster.admin_url("n1"), cluster.admin_token + "x")

    assert response.status == 401
    assert 'id="login"' in page and "not the admin token" in page
    assert COOKIE_NAME not in response.cookies


async def test_login_cookie_opens_admin_until_logout(cluster: Cluster):
    url = cluster.admin_url("n2")
    response, _ = await login(url, cluster.admin_token)
    assert response.status == 303 and response.headers["Location"] == "/"
    morsel = response.cookies[COOKIE_NAME]
    assert morsel["httponly"] and morsel["samesite"] == "Strict"
    cookie = morsel.value

    status, body = await get(url, "/admin/status", cookie)
    assert status == 200 and json.loads(body)["id"] == "n2"
    status, page = await get(url, "/", cookie)
    assert status == 200 and "/static/dashboard.js" in page
    status, _ = await get(cluster.admin_url("n3"), "/admin/status", cookie)
    assert status == 401  # logins belong to the node that made them

    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/logout", allow_redirects=False,
                             headers={"Cookie": f"{COOKIE_NAME}={cookie}"},
                             timeout=_timeout()) as out:
            assert out.status == 303
    status, _ = await get(url, "/admin/status", cookie)
    assert status == 401
    status, page = await get(url, "/", cookie)
    assert status == 200 and 'id="login"' in page


async def test_static_files_are_served_and_others_are_not(cluster: Cluster):
    url = cluster.admin_url("n1")

    for name in ("dashboard.js", "dashboard.css"):
        status, _ = await get(url, "/static/" + name)
        assert status == 200
    for name in ("dashboard.html", "missing.js"):
        status, _ = await get(url, "/static/" + name)
        assert status == 404


async def test_admin_cluster_shows_every_node_and_the_leader(cluster: Cluster):
    leader = await asyncio.to_thread(cluster.leader)

    view = await asyncio.to_thread(cluster.request, "n3", "/admin/cluster")
    assert view["leader"] == leader
    assert [n["id"] for n in view["nodes"]] == ["n1", "n2", "n3"]
    assert all(n["reachable"] and n["lag_entries"] is not None for n in view["nodes"])
    roles = {n["id"]: n["status"]["role"] for n in view["nodes"]}
    assert roles[leader] == "leader"
    assert {"publishes_total", "deliveries_total", "acks_total"} <= set(
        view["nodes"][0]["status"])


async def test_admin_queues_puts_the_longest_queue_first(cluster: Cluster):
    key = await asyncio.to_thread(cluster.create_key, "dash-queues", ["q/*"], ["q/*"])
    client = Client(cluster.ws_url("n1"))
    await client.connect(key["access_key"])
    try:
        for name, times in (("q/short", 1), ("q/long", 3)):
            for _ in range(times):
                await client.publish(name, key["app_id"], b64("x"))
    finally:
        await client.close()

    def ours() -> list[dict]:
        rows = cluster.request("n1", "/admin/queues?limit=1000")["queues"]
        return [r for r in rows if r["app"] == key["app_id"]]

    rows = await asyncio.to_thread(ours)
    assert [(r["name"], r["pending"], r["in_flight"]) for r in rows] == [
        ("q/long", 3, 0), ("q/short", 1, 0)]
    assert rows[0]["app_name"] == "dash-queues"
    page = await asyncio.to_thread(cluster.request, "n1", "/admin/queues?limit=1")
    assert len(page["queues"]) == 1 and page["total"] >= 2


# -- the page in headless Chromium ---------------------------------------------------


class DevToolsError(Exception):
    pass


class DevTools:
    """One page target over the DevTools protocol: calls, and evaluate."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        deadline = time.monotonic() + DEVTOOLS_REPLY_S
        for _ in range(DEVTOOLS_FRAMES_PER_CALL_MAX):
            left_s = max(0.0, deadline - time.monotonic())
            msg = await asyncio.wait_for(self.ws.receive(), left_s)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise DevToolsError(f"DevTools socket closed: {msg.type}")
            reply = json.loads(msg.data)
            if reply.get("id") != call_id:
                continue  # an event, or a late reply to an earlier call
            if "error" in reply:
                raise DevToolsError(f"{method}: {reply['error']}")
            return reply["result"]
        raise DevToolsError(f"{method}: no reply within {DEVTOOLS_FRAMES_PER_CALL_MAX} "
                            "frames")

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(result["exceptionDetails"].get("text", "exception"))
        return result["result"].get("value")

    async def until(self, expression: str, what: str, timeout_s: float = PAGE_WAIT_S):
        """Evaluate until the value is truthy; page loads in between are expected."""
        deadline = time.monotonic() + timeout_s
        value, problem = None, None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except (DevToolsError, asyncio.TimeoutError) as exc:
                problem = exc
            if value:
                return value
            await asyncio.sleep(POLL_INTERVAL_S)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                             f"last value {value!r}, last error {problem}")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def start_chromium(binary: str, profile: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent)  # noqa: PLW1509 (only calls prctl)


def stop_chromium(browser: subprocess.Popen) -> None:
    if browser.poll() is not None:
        return
    browser.terminate()
    try:
        browser.wait(timeout=BROWSER_STOP_S)
    except subprocess.TimeoutExpired:
        browser.kill()
        browser.wait(timeout=BROWSER_STOP_S)


async def devtools_port(browser: subprocess.Popen, profile: Path,
                        log_path: Path) -> int:
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + BROWSER_START_S
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            raise AssertionError(f"chromium exited with {browser.returncode}:\n"
                                 + log_path.read_text(errors="replace")[-4000:])
        lines = active.read_text().splitlines() if active.exists() else []
        if lines and lines[0].isdigit():
            return int(lines[0])
        await asyncio.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"no {active} after {BROWSER_START_S} s")


async def page_socket_url(http: aiohttp.ClientSession, port: int) -> str:
    async with http.get(f"http://127.0.0.1:{port}/json/list",
                        timeout=_timeout()) as response:
        targets = await response.json(content_type=None)
    pages = [t for t in targets if t.get("type") == "page"]
    assert pages, f"no page target among {targets}"
    return pages[0]["webSocketDebuggerUrl"]


async def keep_traffic_flowing(publisher: Client, consumer: Client, to: str) -> None:
    """Publish and ack a steady trickle, so the rate charts have something to draw."""
    async def acks() -> None:
        for _ in range(TRAFFIC_EVENTS_MAX):
            try:
                record = await asyncio.wait_for(consumer.records.get(), RECORD_WAIT_S)
            except asyncio.TimeoutError:
                continue
            await consumer.ack(record["idem"], record["block"], record["name"])

    acking = asyncio.create_task(acks())
    try:
        for _ in range(TRAFFIC_EVENTS_MAX):
            await publisher.publish("dash/flow", to, b64("tick"))
            await asyncio.sleep(TRAFFIC_INTERVAL_S)
    finally:
        acking.cancel()


def text_of(selector: str) -> str:
    """A JS expression: the text of every element matching ``selector``."""
    return (f"[...document.querySelectorAll({json.dumps(selector)})]"
            ".map(e => e.textContent)")


async def test_dashboard_in_chromium_shows_leader_rates_and_trace(
        cluster: Cluster, tmp_path: Path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found on PATH; install the Debian package chromium "
                    "(./scripts/run-tests does so when run as root)")

    leader = await asyncio.to_thread(cluster.leader)
    pub_key = await asyncio.to_thread(cluster.create_key, "dash-pub", ["dash/*"],
                                      ["dash/*"])
    con_key = await asyncio.to_thread(cluster.create_key, "dash-con", ["dash/*"],
                                      ["dash/*"])
    publisher, consumer = Client(cluster.ws_url("n2")), Client(cluster.ws_url("n3"))
    await publisher.connect(pub_key["access_key"])
    await consumer.connect(con_key["access_key"])
    await consumer.subscribe("dash/flow")
    reply = await publisher.publish("dash/traced", con_key["app_id"], b64("hello"))
    idem = reply.split("IDEM=")[1].split(";")[0]

    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    browser = start_chromium(binary, profile, log_path)
    traffic = asyncio.create_task(
        keep_traffic_flowing(publisher, consumer, con_key["app_id"]))
    try:
        port = await devtools_port(browser, profile, log_path)
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(await page_socket_url(http, port),
                                       max_msg_size=64 << 20) as ws:
                shot = await drive_dashboard(DevTools(ws), cluster, leader, idem)
    finally:
        traffic.cancel()
        stop_chromium(browser)
        await publisher.close()
        await consumer.close()

    (tmp_path / "dashboard.png").write_bytes(shot)
    # The copy in docs/ is refreshed on request only, so a test run leaves the
    # checkout as it found it: ENSYNC_UPDATE_SCREENSHOT=1 ./scripts/run-tests ...
    if os.environ.get("ENSYNC_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT_DOC.write_bytes(shot)
    assert shot.startswith(b"\x89PNG")


async def drive_dashboard(dev: DevTools, cluster: Cluster, leader: str,
                          idem: str) -> bytes:
    """Sign in on n1, wait for the views to fill, trace ``idem``; a PNG."""
    await dev.call("Emulation.setDeviceMetricsOverride", deviceScaleFactor=1,
                   mobile=False, **VIEWPORT)
    await dev.call("Page.navigate", url=cluster.admin_url("n1") + "/")
    await dev.until("!!document.querySelector('form#login input#token')",
                    "the sign-in form")
    await dev.evaluate(
        f"document.querySelector('#token').value = {json.dumps(cluster.admin_token)};"
        "document.querySelector('form#login').submit(); true")

    await dev.until(f"document.querySelector('#leader')?.textContent === "
                    f"{json.dumps(leader)}", f"the page to show leader {leader}")
    await dev.until("document.querySelectorAll('#nodes-body tr').length === 3 && "
                    "!document.querySelector('#nodes-body tr.down')",
                    "three reachable nodes")
    await dev.evaluate(
        f"document.querySelector('#trace-idem').value = {json.dumps(idem)};"
        "document.querySelector('#trace-form').requestSubmit(); true")
    whats = await dev.until(
        f"(w => w.includes('published') && w.includes('committed') && w)"
        f"({text_of('#trace-body td.what')})", f"the trace of {idem}")
    assert whats[:2] == ["published", "committed"]

    await dev.until("!['–', '0.0/s'].includes("
                    "document.querySelector('#rate-ack').textContent)",
                    "a non-zero ack rate")
    await dev.until(f"+document.querySelector('#chart-ack').dataset.points >= "
                    f"{CHART_POINTS_SHOWN}", "rate charts with a few points")
    queues = await dev.until(text_of("#queues-body td.mono"), "queue rows")
    assert "dash/traced" in queues
    sessions = await dev.until(text_of("#sessions-body td"), "session rows")
    assert "dash-con" in sessions
    return await screenshot(dev)


async def screenshot(dev: DevTools) -> bytes:
    height = await dev.evaluate("document.documentElement.scrollHeight")
    await dev.call("Emulation.setDeviceMetricsOverride", deviceScaleFactor=1,
                   mobile=False, width=VIEWPORT["width"],
                   height=max(VIEWPORT["height"], int(height)))
    await asyncio.sleep(0.3)  # one frame at the new size
    shot = await dev.call("Page.captureScreenshot", format="png")
    return base64.b64decode(shot["data"])
