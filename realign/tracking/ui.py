"""What a user sees in the MLflow UI: each experiment's description and saved view of its runs, each run's one-line
summary (`mlflow.note.content`, the runs table's Description column), and the link that opens the runs table.

Why a link: MLflow 3.17's UI opens an experiment on the tab of its *workflow switch* — GenAI (Overview, Traces) or
Machine learning (Runs). The switch lives in the browser (localStorage `mlflow.workflowType`, GenAI in a fresh
browser) and yields to a `workflowType` URL parameter; the experiment tag `mlflow.experimentKind` is not read
while the switch exists (always, in 3.17). No server-side setting changes where a fresh browser lands, so every
stage and pipeline prints the link `…/#/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=realign`:
the runs tab, and the experiment's saved view `realign` (the tag `mlflow.sharedViewState.realign`, MLflow's own
"share view" format) with the headline metrics as columns. The view orders by run name, which also lists a
pipeline's runs flat instead of folded under their `pipeline/<name>` parent (MLflow nests only by start time).
"""

from __future__ import annotations

import json
import math

from realign.tracking.store import client, tracking_uri
from realign.tracking.tags import TAG_METHOD, TAG_SOURCE, TAG_STAGE

VIEW_KEY = "realign"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
NOTE_TAG = "mlflow.note.content"  # an experiment's description, a run's Description column
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise

# The numbers a realignment is judged by, in the order they are shown.
HEADLINE_METRICS = (("harmful_score", "harmful"), ("finetune_accuracy", "fine-tune accuracy"),
                    ("benign_refusal_rate", "benign over-refusal"), ("changed_fraction", "changed"))
VIEW_METRICS = ("harmful_score", "finetune_accuracy")  # the runs table's metric columns (more would scroll)


def view_state() -> dict:
    """The saved view: MLflow's search facets and table state (the keys its share-view JSON holds).

    Columns: the datasets the run read, the one-line summary (with the intervals, the changed fraction) and the two
    numbers to sort by; MLflow
    orders metric columns alphabetically and draws only those in the window, so a third (changed_fraction) would
    push harmful_score out of a laptop's view. Sorted by run name: the stages in chain
    order (align, attack, evaluate, expo, fuse, …), one method's runs together, and no run folded under a parent.
    """
    columns = ["attributes.`Dataset`", "attributes.`Description`"] + [f"metrics.`{metric}`" for metric in VIEW_METRICS]
    return {"searchFilter": "", "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True, "startTime": "ALL",
            "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": columns, "columnOrder": [*columns[2:], columns[1], columns[0]], "runsHiddenMode": "SHOW_ALL"}


def experiment_description(name: str) -> str:
    return (f"realign experiment {name}: one run per stage (align, attack, evaluate, expo, score, fuse; pipeline and "
            "search runs hold their steps). The runs table (Machine learning view) shows harmful score and fine-tune "
            "accuracy with 95 % intervals; `realign compare` ranks them.")


def experiment_tags(name: str) -> dict[str, str]:
    """Tags a new experiment starts with: its description and the saved view of its runs."""
    return {NOTE_TAG: experiment_description(name), VIEW_TAG: json.dumps(view_state())}


def ui_base() -> str:
    """The address of the UI for this store: the tracking server itself, else where `mlflow ui` would listen."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def runs_link(experiment_id: str, run_id: str = "") -> str:
    """The runs table of the experiment in the saved view, or one run's page."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    if run_id:
        return f"{ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"{ui_base()}/#/experiments/{experiment_id}/runs?{query}"


def runs_line(run_id: str) -> str:
    """One line for the end of a command: where its run is seen in the UI (and how to start the UI for a file)."""
    experiment_id = client().get_run(run_id).info.experiment_id
    line = f"in the MLflow UI: {runs_link(experiment_id)} (this run: {runs_link(experiment_id, run_id)})"
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        line += f"; start it with: mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"
    return line


def _rate(metrics: dict[str, float], metric: str) -> str | None:
    value = metrics.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = f"{value:.1f} %"
    low, high = metrics.get(f"{metric}_ci95_low"), metrics.get(f"{metric}_ci95_high")
    if low is not None and high is not None:
        text += f" [{low:.1f}, {high:.1f}]"
    if f"{metric}_n" in metrics:
        text += f" (n {int(metrics[f'{metric}_n'])})"
    return text


def run_summary(run) -> str:
    """One line: stage and method, the runs it read (by name), the headline metrics with their intervals."""
    tags, metrics = run.data.tags, run.data.metrics
    head = " ".join(part for part in (tags.get(TAG_STAGE, ""), tags.get(TAG_METHOD, "")) if part) or "run"
    parts = [head]
    inputs = []
    for key, source in sorted(tags.items()):
        if key.startswith(TAG_SOURCE) and source:
            role = key[len(TAG_SOURCE):]
            try:
                name = client().get_run(source).data.tags.get("mlflow.runName", source[:8])
            except Exception:  # an input in another store, or deleted: its id still says which
                name = source[:8]
            inputs.append(f"{role} {name}")
    if inputs:
        parts.append("from " + ", ".join(inputs))
    for metric, label in HEADLINE_METRICS:
        if metric == "changed_fraction":
            if metric in metrics:
                parts.append(f"{label} {100 * metrics[metric]:.2f} % of weights")
            continue
        rate = _rate(metrics, metric)
        if rate:
            parts.append(f"{label} {rate}")
    return " · ".join(parts)
