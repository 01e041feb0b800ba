"""The compare dashboard in a real headless Chromium: no console errors, nothing fetched, every figure drawn.

Chromium is Debian's (`apt install chromium`); PyPI has no usable build (playwright and pyppeteer download theirs
from a CDN at install time), so these tests skip where it is absent. Chromium is driven over the DevTools protocol
on a pipe (`--remote-debugging-pipe`: our commands on its fd 3, its answers on fd 4, NUL-terminated JSON), which
needs neither a websocket client nor a driver binary.
"""

import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

from realign.stages.compare import run_compare

from test_compare import MEASURE, RunLogger, _log_verdicts, log_synthetic_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt install chromium")

# Per figure div: its id, whether plotly drew its SVG, how many traces it has and drew, and how many marks
# (scatter points, heat-map images) ended up on the page.
FIGURE_STATE = """JSON.stringify([...document.querySelectorAll('.plotly-graph-div')].map(div => ({
  id: div.id,
  svg: div.querySelectorAll('svg.main-svg').length,
  traces: (div.data || []).length,
  drawn_traces: div.querySelectorAll('.scatterlayer g.trace, .heatmaplayer .hm').length,
  marks: div.querySelectorAll('.scatterlayer path.point, .heatmaplayer image').length,
  error_bars: div.querySelectorAll('.errorbars path.yerror, .errorbars path.xerror').length,
  legend: [...div.querySelectorAll('.legend .legendtext')].map(t => t.textContent),
})))"""


class Chromium:
    """A headless Chromium and one DevTools-protocol connection to it over a pipe."""

    def __init__(self, profile_dir, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        to_chrome_read, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_write = os.pipe()

        def wire_pipes():  # in the child: our pipe ends become its fds 3 and 4, as --remote-debugging-pipe wants
            # Moved above 10 first, so that neither dup2 overwrites the other end when the pipes got fds 3 or 4.
            read_end = fcntl.fcntl(to_chrome_read, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_chrome_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; the page is our own file.
        # The network switches keep Chromium from calling home on a machine with no network.
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={profile_dir}", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "about:blank"]
        self.process = subprocess.Popen(args, preexec_fn=wire_pipes, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium exited (status {self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def open_page(self, url: str) -> str:
        """A new tab with console, log and network events on; returns its session once the page has loaded."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + self.timeout_s
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events):
            self.events.append(self._read_message(deadline))
        return session

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def console_errors(self, session: str) -> list[str]:
        errors = []
        for event in (e for e in self.events if e.get("sessionId") == session):
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
        return errors

    def requested_urls(self, session: str) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("sessionId") == session and e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def test_dashboard_draws_every_figure_offline_without_console_errors(tracking_store, tmp_path, browser):
    log_synthetic_runs(RunLogger())
    run_compare({"out": str(tmp_path / "full")})
    RunLogger("align-only").log("align/dpo", "align", "dpo", {"harmful_score": 5.0})
    run_compare({"experiment": "align-only", "out": str(tmp_path / "empty")})

    full_page = (tmp_path / "full" / "dashboard.html").resolve().as_uri()
    session = browser.open_page(full_page)
    assert browser.console_errors(session) == []
    fetched = [url for url in browser.requested_urls(session) if url != full_page and not url.startswith("data:")]
    assert fetched == [], "the page fetches nothing (heat maps are data: images): it opens offline"
    figures = json.loads(browser.evaluate(session, FIGURE_STATE))
    assert [f["id"] for f in figures] == ["figure-harmful_vs_ratio", "figure-harmful_vs_size", "figure-harmful_vs_alpha",
                                          "figure-fusion_tradeoff", "figure-selection_by_layer",
                                          "figure-selection_by_module"]
    for figure in figures:
        assert figure["svg"] > 0 and figure["traces"] > 0, figure
        assert figure["drawn_traces"] == figure["traces"] and figure["marks"] > 0, figure

    # Figures with nothing to draw are left out with a note, not drawn blank.
    empty_page = (tmp_path / "empty" / "dashboard.html").resolve().as_uri()
    session = browser.open_page(empty_page)
    assert browser.console_errors(session) == []
    assert json.loads(browser.evaluate(session, FIGURE_STATE)) == []
    notes = browser.evaluate(session, "[...document.querySelectorAll('p.note')].map(p => p.textContent).join('|')")
    assert notes.count("not drawn: ") == 7  # the 6 figures and the paired differences


def test_dashboard_draws_error_bars_and_the_paired_differences(tracking_store, tmp_path, browser):
    logger = RunLogger("intervals")
    dpo = logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0, "harmful_score_ci95_low": 1.7,
                                                   "harmful_score_ci95_high": 13.6}, tags=MEASURE)
    attacks = []
    for ratio, flagged in ((0.1, 14), (0.2, 22)):
        score = 100 * flagged / 40
        attacks.append(logger.log(
            f"attack/dpo/sst2/p{ratio}/n100", "attack", "dpo",
            {"harmful_score": score, "harmful_score_ci95_low": score - 14, "harmful_score_ci95_high": score + 15,
             "finetune_accuracy": 90.0, "finetune_accuracy_ci95_low": 80.0, "finetune_accuracy_ci95_high": 95.0},
            params={"task": "sst2", "ratio": ratio, "size": 100}, tags={**MEASURE, "realign.source.aligned": dpo}))
        _log_verdicts(logger.client, attacks[-1], [i < flagged for i in range(40)])
    _log_verdicts(logger.client, dpo, [i < 2 for i in range(40)])
    run_compare({"experiment": "intervals", "out": str(tmp_path / "intervals")})

    session = browser.open_page((tmp_path / "intervals" / "dashboard.html").resolve().as_uri())
    assert browser.console_errors(session) == []
    figures = {f["id"]: f for f in json.loads(browser.evaluate(session, FIGURE_STATE))}
    assert figures["figure-harmful_vs_ratio"]["error_bars"] == 2, "one bar per attack's harmful score"
    paired = figures["figure-paired_differences"]
    assert paired["drawn_traces"] == paired["traces"] >= 1 and paired["marks"] == 2
    assert paired["error_bars"] == 2 and paired["legend"] == ["interval excludes 0"]


def test_a_script_error_on_the_page_is_caught(tmp_path, browser):
    """The check itself can fail: a page that logs an error and throws is reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); undefinedFunction();</script>"
                    "</body></html>")
    session = browser.open_page(page.as_uri())
    errors = browser.console_errors(session)
    assert any("boom" in e for e in errors) and any("undefinedFunction" in e for e in errors), errors
