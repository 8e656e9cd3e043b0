#!/usr/bin/env python3
"""The cluster view of `flotilla dev`, tested in a real browser.

Starts `flotilla dev` (three real members on 127.0.0.1) and headless Chromium (or Firefox) on
its page, and drives the page through the Chrome DevTools Protocol (or WebDriver BiDi), with a
small WebSocket client below (standard library only): the page must show three members and one leader with its log; a put made with
the page's form must show as a committed entry on every member; killing the leader with the
page's button must show a new leader in a higher term; restarting the old one with its button
must show it back as a follower; cutting the new leader off from the others with its button
must show yet another leader and the cut links, and healing it must show it following again;
a learner added from the page must catch up, be promoted, and be removed. Each wait is for a state of the page, bounded. Screenshots of
each stage go to the artifacts directory. The page's own event stream (/events) is checked
too, and the controls refuse a request without the page's header.

    scripts/test-cluster-view.py FLOTILLA_BINARY ARTIFACTS_DIR [chromium|firefox]

Chromium comes from Debian's `chromium` package; without it the test says so and fails
(CI installs it and runs the test with it). With `firefox` the same checks run in Firefox
(Debian's `firefox-esr`) over WebDriver BiDi. Every process started here is stopped by PID at
the end.
"""

import base64
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

LIMIT_S = 180  # the whole test
WAIT_S = 30  # one state of the page
ARTIFACTS = "."  # set from the command line


def fail(why):
    print(f"FAIL: {why}", flush=True)
    raise SystemExit(1)


def ok(what):
    print(f"ok: {what}", flush=True)


class WebSocket:
    """A text-only WebSocket client (RFC 6455), enough for the DevTools protocol."""

    def __init__(self, url):
        match = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url)
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=WAIT_S)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                fail("the browser closed the DevTools connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            fail(f"the DevTools handshake was refused: {head!r}")

    def send(self, text):
        data = text.encode()
        header = bytearray([0x81])  # FIN, text
        if len(data) < 126:
            header.append(0x80 | len(data))
        elif len(data) < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack(">H", len(data))
        else:
            header.append(0x80 | 127)
            header += struct.pack(">Q", len(data))
        mask = os.urandom(4)
        header += mask
        self.sock.sendall(bytes(header) + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                fail("the browser closed the DevTools connection")
            data += chunk
        return data

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._exact(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(length)
            opcode = b0 & 0x0F
            if opcode == 8:
                fail("the browser closed the DevTools connection")
            if opcode in (9, 10):  # ping, pong: not used by Chromium here
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()


class Page:
    """One page of the browser, driven by DevTools protocol commands."""

    def __init__(self, ws_url):
        self.ws = WebSocket(ws_url)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                # Both protocols answer a failed command with an "error" field.
                if "error" in message:
                    fail(f"{method}: {message['error']} {message.get('message', '')}")
                return message["result"]

    def eval(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            fail(f"the page threw evaluating {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, what, expression):
        """Waits until `expression` is truthy in the page; returns its value."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        fail(f"the page did not show {what} within {WAIT_S} s: {self.eval('document.body.innerText')[:2000]}")

    def capture(self):
        """A PNG of the page, base64-encoded."""
        return self.call("Page.captureScreenshot", format="png")["data"]

    def screenshot(self, path):
        data = self.capture()
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        print(f"screenshot: {path}", flush=True)


class FirefoxPage(Page):
    """The same page driven over WebDriver BiDi, the protocol Firefox speaks."""

    def __init__(self, ws_url, url):
        super().__init__(ws_url)
        self.call("session.new", capabilities={})
        self.context = self.call("browsingContext.getTree")["contexts"][0]["context"]
        self.call("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def eval(self, expression):
        # The value comes back as JSON text, as plain as the DevTools protocol gives it.
        result = self.call(
            "script.evaluate",
            expression=f"JSON.stringify({expression})",
            target={"context": self.context},
            awaitPromise=False,
        )
        if result.get("type") != "success":
            fail(f"the page threw evaluating {expression!r}: {result}")
        text = result["result"].get("value")
        return None if text is None else json.loads(text)

    def capture(self):
        return self.call("browsingContext.captureScreenshot", context=self.context)["data"]


def start_firefox(profile_dir):
    browser = shutil.which("firefox-esr") or shutil.which("firefox")
    if browser is None:
        fail("firefox is not installed (apt-get install firefox-esr)")
    os.makedirs(profile_dir, exist_ok=True)
    firefox = subprocess.Popen(
        [browser, "--headless", "--no-remote", "--profile", profile_dir,
         "--remote-debugging-port=0", "--window-size=1400,1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    match = first_match(firefox.stderr, r"WebDriver BiDi listening on (ws://127\.0\.0\.1:\d+)", "firefox", "its BiDi address")
    return firefox, match.group(1) + "/session"


def read_events(ui, count):
    """The first `count` events of the page's stream, as (event, data) pairs."""
    conn = http.client.HTTPConnection(ui, timeout=WAIT_S)
    conn.request("GET", "/events")
    response = conn.getresponse()
    if response.status != 200 or "text/event-stream" not in response.getheader("content-type", ""):
        fail(f"/events answered {response.status} {response.getheader('content-type')}")
    events, name = [], None
    while len(events) < count:
        line = response.fp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    conn.close()
    return events


def check_event_stream(ui):
    events = read_events(ui, 7)
    kinds = [name for name, _ in events]
    if kinds[0] != "cluster" or events[0][1]["members"] != ["node1", "node2", "node3"]:
        fail(f"the stream does not start with the cluster: {events[0]}")
    if kinds[1:4] != ["process"] * 3 or any(d["state"] != "running" for _, d in events[1:4]):
        fail(f"the stream does not go on with each member's process: {events[1:4]}")
    views = [d for name, d in events[4:] if name == "view"]
    if len(views) != 3 or sorted(v["name"] for v in views) != ["node1", "node2", "node3"]:
        fail(f"the stream does not give each member's latest view: {kinds}")
    for view in views:
        for field in ("member", "role", "term", "commit", "applied", "log_tail", "messages_sent"):
            if field not in view["view"]:
                fail(f"a view lacks {field}: {view}")
    ok("/events: the cluster, each member's process and latest view")
    conn = http.client.HTTPConnection(ui, timeout=WAIT_S)
    conn.request("POST", "/api/pause?member=node1")
    response = conn.getresponse()
    body = response.read().decode()
    if response.status != 403 or "x-flotilla-dev" not in body:
        fail(f"a control without the page's header was not refused: {response.status} {body}")
    ok("a control without the page's header is refused (403)")


def start_dev(binary, data_dir):
    dev = subprocess.Popen(
        [binary, "dev", "--data-dir", data_dir, "--fresh", "--ui-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    match = first_match(dev.stdout, r"the cluster view is at http://([0-9.]+:\d+)/", "flotilla dev", "the cluster view's address")
    return dev, match.group(1)


def first_match(lines, pattern, who, what):
    """The first line of the output `lines` that matches `pattern`; fails if it ends first.
    The rest of the output is read on by a thread (into ARTIFACTS/<who>.log), so that a
    process writing on never blocks on a full pipe."""
    while True:
        line = lines.readline()
        if not line:
            fail(f"{who} exited before printing {what}")
        match = re.search(pattern, line)
        if match:
            break
    def drain():
        with open(os.path.join(ARTIFACTS, f"{who.replace(' ', '-')}.log"), "a") as log:
            for rest in lines:
                log.write(rest)
    threading.Thread(target=drain, daemon=True).start()
    return match


def start_chromium(profile_dir, url):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        fail("chromium is not installed (apt-get install chromium); the browser test cannot run")
    chrome = subprocess.Popen(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--remote-debugging-port=0", f"--user-data-dir={profile_dir}",
            "--window-size=1400,1000", url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    port = int(first_match(chrome.stderr, r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", "chromium", "its DevTools address").group(1))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        conn.request("GET", "/json/list")
        targets = json.loads(conn.getresponse().read())
        pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(url)]
        if pages:
            return chrome, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    fail("chromium opened no page")


def stop(process, name, grace_s=25):
    """SIGTERM to the process group, SIGKILL after the grace; by PID."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in {grace_s} s; killing it", flush=True)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run(binary, artifacts, browser):
    global ARTIFACTS
    ARTIFACTS = artifacts
    os.makedirs(artifacts, exist_ok=True)
    work = tempfile.mkdtemp(prefix="flotilla-cluster-view.")
    dev = chrome = None
    try:
        dev, ui = start_dev(binary, os.path.join(work, "dev"))
        if browser == "firefox":
            chrome, ws_url = start_firefox(os.path.join(work, "firefox"))
            page = FirefoxPage(ws_url, f"http://{ui}/")
        else:
            chrome, ws_url = start_chromium(os.path.join(work, "chrome"), f"http://{ui}/")
            page = Page(ws_url)
            page.call("Runtime.enable")

        page.wait_for("three members", "document.querySelectorAll('.member').length === 3")
        first = page.wait_for(
            "one leader and two followers",
            "(() => { const l = document.querySelectorAll('.member[data-role=leader]');"
            " const f = document.querySelectorAll('.member[data-role=follower]');"
            " return l.length === 1 && f.length === 2 ? [l[0].dataset.name, Number(l[0].dataset.term)] : null; })()",
        )
        ok(f"the page shows three members, {first[0]} leading term {first[1]}")
        page.wait_for("the live connection", "document.getElementById('connection').textContent === 'live'")
        page.screenshot(os.path.join(artifacts, "1-elected.png"))

        check_event_stream(ui)

        page.eval("document.getElementById('put-key').value = 'seen-in-the-browser'")
        page.eval("document.querySelector('#put button').click()")
        status = page.wait_for("the put's answer", "(() => { const s = document.getElementById('status').textContent; return s.includes('revision') ? s : null; })()")
        ok(f"the page's put: {status}")
        # The put's entry is the newest: committed (solid) on every member.
        page.wait_for(
            "the put committed on every member",
            "[...document.querySelectorAll('.log')].length === 3 && [...document.querySelectorAll('.log')].every(row =>"
            " { const e = row.querySelectorAll('.entry'); return e.length > 0 && !e[e.length - 1].classList.contains('uncommitted')"
            " && row.textContent.includes('commit'); })",
        )
        ok("the put shows as a committed entry on every member")
        page.screenshot(os.path.join(artifacts, "2-put.png"))

        old, old_term = first
        page.eval(f"document.querySelector('button[data-action=kill][data-member={old}]').click()")
        page.wait_for(f"{old} killed", f"document.querySelector('.member[data-name={old}]').dataset.role === 'killed'")
        new = page.wait_for(
            "a new leader in a higher term",
            f"(() => {{ const l = document.querySelectorAll('.member[data-role=leader]');"
            f" return l.length === 1 && l[0].dataset.name !== '{old}' && Number(l[0].dataset.term) > {old_term}"
            f" ? [l[0].dataset.name, Number(l[0].dataset.term)] : null; }})()",
        )
        ok(f"after the kill from the page: {new[0]} leads term {new[1]} (was {old}, term {old_term})")
        page.wait_for("the timeline's kill", f"document.getElementById('timeline').textContent.includes('{old} killed')")
        page.screenshot(os.path.join(artifacts, "3-new-leader.png"))

        page.eval(f"document.querySelector('button[data-action=restart][data-member={old}]').click()")
        page.wait_for(f"{old} back as a follower", f"document.querySelector('.member[data-name={old}]').dataset.role === 'follower'")
        ok(f"{old}, restarted from the page, is a follower again")
        page.screenshot(os.path.join(artifacts, "4-restarted.png"))

        cut, cut_term = new
        page.eval(f"document.querySelector('button[data-action=partition][data-member={cut}]').click()")
        after = page.wait_for(
            "a new leader once the leader is cut off",
            f"(() => {{ const l = [...document.querySelectorAll('.member[data-role=leader]')]"
            f".filter(m => m.dataset.name !== '{cut}');"
            f" return l.length === 1 && Number(l[0].dataset.term) > {cut_term}"
            f" ? [l[0].dataset.name, Number(l[0].dataset.term)] : null; }})()",
        )
        page.wait_for("the cut links drawn", "document.querySelectorAll('line.edge.cut').length === 2")
        ok(f"after cutting {cut} off from the page: {after[0]} leads term {after[1]}")
        page.screenshot(os.path.join(artifacts, "5-partitioned.png"))
        page.eval(f"document.querySelector('button[data-action=heal][data-member={cut}]').click()")
        page.wait_for(
            f"{cut} following {after[0]} once healed",
            f"document.querySelector('.member[data-name={cut}]').dataset.role === 'follower'"
            f" && document.querySelectorAll('line.edge.cut').length === 0"
            f" && document.querySelectorAll('.member[data-role=leader]').length === 1",
        )
        ok(f"{cut}, healed from the page, follows again")

        page.eval("document.getElementById('add-learner').click()")
        page.wait_for("node4 as a learner", "document.querySelector('.member[data-name=node4]')?.dataset.role === 'learner'")
        # Promotion is refused until the learner has caught up: wait for its log to end where
        # the leader's does, committed.
        page.wait_for(
            "node4's log caught up",
            "(() => { const rows = [...document.querySelectorAll('.log')];"
            " const last = (row) => { const e = row.querySelectorAll('.entry'); return e.length ? e[e.length - 1].textContent : null; };"
            " const leader = document.querySelector('.member[data-role=leader]')?.dataset.name;"
            " const of = (name) => rows.find(r => r.querySelector('.who').textContent === name);"
            " return leader && of('node4') && last(of('node4')) !== null && last(of('node4')) === last(of(leader)); })()",
        )
        ok("a learner added from the page joins and catches up")
        page.eval("document.querySelector('button[data-action=promote][data-member=node4]').click()")
        page.wait_for(
            "node4 promoted",
            "document.querySelector('.member[data-name=node4]').dataset.role === 'follower'"
            " && document.getElementById('summary').textContent.endsWith(', 4 voters')",
        )
        ok("node4, promoted from the page, is a voting follower")
        page.screenshot(os.path.join(artifacts, "6-four-members.png"))
        page.eval("document.querySelector('button[data-action=remove][data-member=node4]').click()")
        page.wait_for("node4 removed", "document.querySelector('.member[data-name=node4]').dataset.role === 'removed'")
        page.wait_for(
            "three voters again",
            "document.getElementById('summary').textContent.endsWith(', 3 voters')",
        )
        ok("node4, removed from the page, is gone from the cluster")
    finally:
        stop(chrome, browser, grace_s=5)
        stop(dev, "flotilla dev")
        # The members' logs, for a failure's cause.
        for log in glob.glob(os.path.join(work, "dev", "*.log")):
            shutil.copy(log, artifacts)
        shutil.rmtree(work, ignore_errors=True)
    print("cluster view: every check passed", flush=True)


def main():
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] not in ("chromium", "firefox")):
        print(__doc__)
        raise SystemExit(2)
    signal.signal(signal.SIGALRM, lambda *_: fail(f"the test ran past its {LIMIT_S} s bound"))
    signal.alarm(LIMIT_S)
    run(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "chromium")


if __name__ == "__main__":
    main()
