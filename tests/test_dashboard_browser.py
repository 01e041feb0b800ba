"""The compare dashboard in a real headless Chromium (tests/browser.py): no console errors, nothing fetched, every
figure drawn."""

import json

import pytest

from realign.stages.compare import run_compare

from test_compare import MEASURE, RunLogger, _log_verdicts, log_synthetic_runs

from browser import CHROMIUM

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
