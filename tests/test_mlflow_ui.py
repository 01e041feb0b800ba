"""What a user sees in a real `mlflow ui`, in headless Chromium (tests/browser.py): the link every command prints
opens the runs table (not the GenAI overview) with the summary and harmful score in view, a fuse run's page shows
its harmful score, and the datasets a run read are named in the Datasets column."""

import json
import re
import subprocess
import sys

import mlflow
import pytest

from realign import tracking
from realign.stages.align import run_align
from realign.stages.attack import run_attack
from realign.stages.fuse import run_fuse
from realign.tracking import ui

from conftest import TINY, free_port, module_store, wait_for_health
from test_fuse import ATTACK

QUIET_EVAL = {"eval.judge": "keyword", "eval.num_prompts": "8", "eval.max_new_tokens": "4",
              "eval.task_examples": "4", "eval.benign_prompts": "2"}
HEADERS = "JSON.stringify([...document.querySelectorAll('.ag-header-cell')].map(e => e.innerText.trim()))"
# ag-grid draws a row twice, its pinned (name) part and its scrolled part: joined by row index.
ROWS = """JSON.stringify(Object.values([...document.querySelectorAll('.ag-row')].reduce((rows, e) => {
  const i = e.getAttribute('row-index'); rows[i] = (rows[i] || '') + '\\n' + e.innerText; return rows; }, {})))"""


def fused_chain() -> dict[str, str]:
    """align/sft → attack → an evaluated fuse run on the tiny model, in the current store: their run ids."""
    sft = run_align({**TINY, "method": "sft", "eval.enabled": "false"})
    attack = run_attack({**ATTACK, "source_run": sft})
    fuse = run_fuse({"model": "tiny", "method": "task_arithmetic", "finetuned_run": attack, "reference_run": sft,
                     **QUIET_EVAL})
    return {"sft": sft, "attack": attack, "fuse": fuse}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    with module_store(tmp_path_factory, "ui-store") as (folder, uri):
        yield {"folder": folder, "uri": uri, **fused_chain()}


@pytest.fixture(scope="module")
def mlflow_ui(chain):
    port = free_port()
    log = chain["folder"] / "ui.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
                                    "--backend-store-uri", chain["uri"]], cwd=chain["folder"], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, 90, what="mlflow ui", log=log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _printed_links(monkeypatch, mlflow_ui, run_id):
    """The links the command's last stderr line gives, pointed at this test's UI instead of port 5000."""
    monkeypatch.setattr(ui, "DEFAULT_UI", mlflow_ui)
    line = ui.runs_line(run_id)
    table, run_page = re.search(r"in the MLflow UI: (\S+) \(this run: (\S+)\)", line).groups()
    return table, run_page


def test_the_printed_link_opens_the_runs_table_with_harmful_score_in_view(store, mlflow_ui, browser, monkeypatch):
    table, _ = _printed_links(monkeypatch, mlflow_ui, store["fuse"])
    session = browser.open_page("about:blank")
    browser.set_window(session, 1280, 800)  # a laptop's window: the columns must be in view, not scrolled to
    browser.call("Page.navigate", {"url": table}, session)
    headers = json.loads(browser.wait_for(session, f"(h => h.includes('harmful_score') ? JSON.stringify(h) : '')"
                                                   f"({HEADERS[len('JSON.stringify('):-1]})") or "[]")
    assert {"Run Name", "harmful_score", "finetune_accuracy"} <= set(headers), (
        headers, browser.evaluate(session, "location.href"), browser.evaluate(session, "document.body.innerText")[:1500])
    browser.set_window(session, 1920, 1000)  # a wider window shows the rest of the view's columns
    headers = json.loads(browser.wait_for(session, f"(h => h.includes('Dataset') ? JSON.stringify(h) : '')"
                                                   f"({HEADERS[len('JSON.stringify('):-1]})") or "[]")
    assert {"Description", "Dataset"} <= set(headers), headers
    rows = json.loads(browser.evaluate(session, ROWS))
    fuse_run = mlflow.get_run(store["fuse"])
    fuse_row = next(row for row in rows if fuse_run.data.tags["mlflow.runName"] in row)
    assert "fuse task_arithmetic · from finetuned" in fuse_row, fuse_row  # the summary (cut to the column's width)
    assert "builtin:test" in fuse_row or "sst2-test" in fuse_row or "builtin:benign-test" in fuse_row, fuse_row
    score = fuse_run.data.metrics["harmful_score"]
    assert f"{score:g}" in fuse_row.splitlines(), (score, fuse_row)  # the harmful_score column
    assert len(rows) == 3, "the chain's three runs, none folded under another"
    assert "/runs?" in browser.evaluate(session, "location.href"), "the runs tab, not the GenAI overview"


def test_a_fuse_runs_page_shows_its_harmful_score_and_the_datasets_it_read(store, mlflow_ui, browser, monkeypatch):
    _, run_page = _printed_links(monkeypatch, mlflow_ui, store["fuse"])
    session = browser.open_page("about:blank")
    browser.set_window(session, 1280, 1000)
    browser.call("Page.navigate", {"url": run_page}, session)
    text = browser.wait_for(session, "(t => t.includes('harmful_score') && t.includes('Datasets') ? t : '')"
                                     "(document.body.innerText)")
    assert text, browser.evaluate(session, "document.body.innerText")[:2000]
    fuse = mlflow.get_run(store["fuse"])
    assert f"harmful_score\n{fuse.data.metrics['harmful_score']:g}\n" in text  # the metrics table: name, value
    # The Datasets box: the first input by name and digest, the others counted (+N, unfolded on click).
    first = fuse.inputs.dataset_inputs[0].dataset
    assert f"{first.name} ({first.digest})" in text
    assert f"+{len(fuse.inputs.dataset_inputs) - 1}" in text


def test_runs_and_experiments_describe_themselves(store):
    fuse = mlflow.get_run(store["fuse"])
    summary = fuse.data.tags[ui.NOTE_TAG]
    attack_name = mlflow.get_run(store["attack"]).data.tags["mlflow.runName"]
    assert summary.startswith("fuse task_arithmetic · from ")
    assert f"finetuned {attack_name}" in summary
    low, high = fuse.data.metrics["harmful_score_ci95_low"], fuse.data.metrics["harmful_score_ci95_high"]
    assert f"harmful {fuse.data.metrics['harmful_score']:.1f} % [{low:.1f}, {high:.1f}] (n 8)" in summary
    experiment = mlflow.get_experiment(fuse.info.experiment_id)
    assert experiment.tags[ui.NOTE_TAG].startswith("realign experiment")
    view = json.loads(experiment.tags[ui.VIEW_TAG])
    assert "metrics.`harmful_score`" in view["selectedColumns"]
    # Every evaluation prompt set is a run input, with its context.
    inputs = {d.dataset.name: [t.value for t in d.tags] for d in fuse.inputs.dataset_inputs}
    assert inputs == {"builtin:test": ["evaluation"], "builtin:benign-test": ["evaluation"],
                      "sst2-test": ["evaluation"]}, inputs
    attack = mlflow.get_run(store["attack"])
    assert any(d.dataset.name.startswith("attack-") for d in attack.inputs.dataset_inputs)
    assert tracking.TAG_STAGE in fuse.data.tags
