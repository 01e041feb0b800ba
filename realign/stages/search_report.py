"""The end of a search: the Pareto-optimal trials evaluated again on the report half of the prompts, the table of
every trial (`search/pareto.json`) and the front as a plotly figure on the parent run."""

from __future__ import annotations

import json
from typing import Any

from realign import tracking
from realign.search import SearchSpec

REPORTED = ("harmful_score", "refusal_rate", "benign_refusal_rate", "finetune_accuracy")


def report_evaluation(spec: SearchSpec, run_id: str, experiment: str) -> dict[str, float]:
    """The trial's last run evaluated on the report half, as it was on the search half otherwise (an evaluate run,
    reused when one exists); returns report_<metric> values, also logged on the trial's run."""
    from realign.stages.pipeline import run_or_reuse

    run = tracking.client().get_run(run_id)
    settings = {k: v for k, v in run.data.params.items() if k.startswith("eval.")}
    settings.update({"eval.prompt_split": "report", "eval.enabled": "true"})
    if not settings.get("eval.task"):
        settings["eval.task"] = run.data.tags.get(tracking.TAG_TASK, "")
    # the trial's run keeps its own (search-half) numbers and measure; only report_<metric> is added to it
    overrides = {"run": run_id, "experiment": experiment, "copy_to_run": "false", **settings}
    if spec.model:
        overrides["model"] = spec.model
    evaluate_id, _ = run_or_reuse("evaluate", overrides, experiment)
    metrics = tracking.run_metrics(evaluate_id)
    reported = {f"report_{key}": value for key, value in metrics.items()
                if key.split("_ci95_")[0] in REPORTED and not key.endswith("_n")}
    for key, value in reported.items():
        tracking.client().log_metric(run_id, key, value)
    return reported


def log_front(spec: SearchSpec, study, parent_id: str, experiment: str) -> None:
    import optuna

    last = list(spec.steps)[-1]
    front = {t.number for t in study.best_trials}
    rows: dict[str, list] = {k: [] for k in ("trial", "state", "params", "on_front", "run_id")}
    for metric, _ in spec.objectives:
        rows[metric] = []
        rows[f"report_{metric}"] = []
    for trial in study.trials:
        run_id = trial.user_attrs.get(f"run:{last}", "")
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        reported = report_evaluation(spec, run_id, experiment) if complete and trial.number in front else {}
        rows["trial"].append(trial.number)
        rows["state"].append(trial.state.name)
        rows["params"].append(json.dumps(trial.params, sort_keys=True))
        rows["on_front"].append(trial.number in front)
        rows["run_id"].append(run_id)
        for index, (metric, _) in enumerate(spec.objectives):
            rows[metric].append(trial.values[index] if complete else None)
            rows[f"report_{metric}"].append(reported.get(f"report_{metric}"))
    tracking.log_parent_table(parent_id, rows, "search/pareto.json")
    figure = front_figure(spec.study, spec.objectives, rows, intervals(spec.objectives, rows), anchors(rows))
    if figure is not None:
        tracking.client().log_figure(parent_id, figure, "figures/pareto.html")


def intervals(objectives: list[tuple[str, str]], rows: dict[str, list]) -> dict[str, list[tuple[float, float] | None]]:
    """Each trial's 95 % interval of each objective (its run's `<metric>_ci95_low/high`), None where not logged."""
    out: dict[str, list] = {metric: [] for metric, _ in objectives}
    for run_id, state in zip(rows["run_id"], rows["state"]):
        metrics = tracking.run_metrics(run_id) if run_id and state == "COMPLETE" else {}
        for metric in out:
            low, high = metrics.get(f"{metric}_ci95_low"), metrics.get(f"{metric}_ci95_high")
            out[metric].append((low, high) if low is not None and high is not None else None)
    return out


def anchors(rows: dict[str, list]) -> dict[str, dict[str, float]]:
    """The unrepaired attacked model and the safety reference of the trials' last runs (their own evaluations, on
    all of the held-out prompts), by role."""
    run_id = next((r for r, state in zip(rows["run_id"], rows["state"]) if r and state == "COMPLETE"), "")
    if not run_id:
        return {}
    tags = tracking.client().get_run(run_id).data.tags
    found = {}
    for role, label in (("finetuned", "attacked (unrepaired)"), ("reference", "safety reference")):
        source = tags.get(f"{tracking.TAG_SOURCE}{role}", "")
        if source:
            found[label] = tracking.run_metrics(source)
    return found


def _error(values: list, bounds: list) -> dict:
    if not any(bounds):
        return {}
    return {"type": "data", "symmetric": False,
            "array": [b[1] - v if b else 0.0 for v, b in zip(values, bounds)],
            "arrayminus": [v - b[0] if b else 0.0 for v, b in zip(values, bounds)]}


def front_figure(study: str, objectives: list[tuple[str, str]], rows: dict[str, list],
                 bounds: dict[str, list] | None = None,
                 anchor_metrics: dict[str, dict[str, float]] | None = None) -> Any:
    """All complete trials on the first two objectives (95 % intervals), the front marked, the report-half values
    of the front, and the unrepaired and reference models as anchors."""
    if len(objectives) < 2:
        return None
    import plotly.graph_objects as go

    (x_metric, _), (y_metric, _) = objectives[:2]
    none = [None] * len(rows["trial"])
    x_bounds, y_bounds = (bounds or {}).get(x_metric, none), (bounds or {}).get(y_metric, none)
    done = [i for i, state in enumerate(rows["state"]) if state == "COMPLETE"]
    figure = go.Figure()
    for on_front, name, symbol in ((False, "trials", "circle-open"), (True, "Pareto front (search half)", "circle")):
        picked = [i for i in done if rows["on_front"][i] == on_front]
        xs, ys = [rows[x_metric][i] for i in picked], [rows[y_metric][i] for i in picked]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=name, marker={"symbol": symbol, "size": 10},
                                    error_x=_error(xs, [x_bounds[i] for i in picked]),
                                    error_y=_error(ys, [y_bounds[i] for i in picked]),
                                    text=[f"trial {rows['trial'][i]}: {rows['params'][i]}" for i in picked],
                                    hovertemplate="%{text}<br>%{x:.1f}, %{y:.1f}<extra></extra>"))
    for label, metrics in (anchor_metrics or {}).items():
        if x_metric in metrics and y_metric in metrics:
            figure.add_trace(go.Scatter(x=[metrics[x_metric]], y=[metrics[y_metric]], mode="markers+text",
                                        name=f"{label} (all prompts)", text=[label], textposition="top center",
                                        marker={"symbol": "x", "size": 12}))
    reported = [i for i in done if rows[f"report_{x_metric}"][i] is not None]
    if reported:
        figure.add_trace(go.Scatter(x=[rows[f"report_{x_metric}"][i] for i in reported],
                                    y=[rows[f"report_{y_metric}"][i] for i in reported], mode="markers",
                                    name="front, report half", marker={"symbol": "diamond", "size": 10}))
    figure.update_layout(title=f"search {study}: {x_metric} vs {y_metric}", xaxis_title=x_metric,
                         yaxis_title=y_metric, template="plotly_white")
    return figure


def searches_in(runs) -> tuple[Any, list]:
    """Every finished search among `runs` (mlflow.search_runs' frame, newest first; one per study, the newest):
    a table of each one's Pareto-optimal trials on both halves of the prompts, and each one's front figure.
    Returns (table, charts); the table is empty when there is no search."""
    import pandas as pd

    from realign.dashboards import Chart
    from realign.stages.search import TAG_OBJECTIVES, TAG_STUDY

    stage, study_tag = f"tags.{tracking.TAG_STAGE}", f"tags.{TAG_STUDY}"
    if runs.empty or stage not in runs or study_tag not in runs or f"tags.{TAG_OBJECTIVES}" not in runs:
        return pd.DataFrame(), []
    searches = runs[(runs[stage] == "search") & runs[f"tags.{TAG_OBJECTIVES}"].notna()].drop_duplicates(study_tag)
    tables, charts = [], []
    for _, search in searches.iterrows():
        objectives = [tuple(item.split(":", 1)) for item in str(search[f"tags.{TAG_OBJECTIVES}"]).split(",")]
        trials = tracking.load_run_table(search["run_id"], "search/pareto.json")
        if trials.empty:
            continue
        trials = trials.astype(object).where(trials.notna(), None)
        rows = {column: trials[column].tolist() for column in trials.columns}
        study = str(search[study_tag])
        figure = front_figure(study, objectives, rows, intervals(objectives, rows), anchors(rows))
        charts.append(Chart(f"search_{study}", f"Search {study}: the Pareto front", figure,
                            note="" if figure is not None else "fewer than two objectives"))
        front = trials[trials["on_front"].astype(bool)].copy()
        front.insert(0, "study", study)
        # each value's 95 % interval, from the trial's run (`<metric>_ci95_low`, `report_<metric>_ci95_low`, ...)
        metrics = [tracking.run_metrics(run_id) if run_id else {} for run_id in front["run_id"]]
        for metric, _ in objectives:
            for name in (metric, f"report_{metric}"):
                for bound in ("low", "high"):
                    values = [m.get(f"{name}_ci95_{bound}") for m in metrics]
                    if any(v is not None for v in values):
                        front.insert(list(front.columns).index(name) + (1 if bound == "low" else 2),
                                     f"{name} ci95_{bound}", values)
        front["search_run_id"] = search["run_id"]
        tables.append(front.drop(columns=["on_front", "state"]))
    return (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()), charts
