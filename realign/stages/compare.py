"""`compare` stage: the seed's tables and plotly figures from an experiment's runs, as one `compare` run.

Runs are pulled with `mlflow.search_runs` (FINISHED, tagged complete, plus an optional filter); the tables and
figures are built from their tags, params and metrics alone by `realign.dashboards`. The compare run holds
`tables/<name>.csv` and `.md`, `tables/runs.csv` (every run compared), `figures/<name>.json` (plotly JSON) and
`dashboard.html`, one self-contained page with plotly.js embedded (opens offline). The markdown tables go to
stdout; `out` writes the dashboard and the tables to a local folder too.

From Python: `run_compare({"experiment": "realign", "out": "report"})`, or, for a notebook's own search,
`realign.dashboards.build_report(mlflow.search_runs(...))`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from realign import dashboards, ranking, tracking
from realign.config import from_dict, set_dotted
from realign.stage_configs import CompareConfig
from realign.errors import RealignError
from realign.stages.base import Stage, register, run_stage

COMPLETE_RUNS = f"attributes.status = 'FINISHED' and tags.`{tracking.TAG_COMPLETE}` = 'true'"


def resolve_compare_config(overrides: dict[str, Any]) -> CompareConfig:
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(data, key, value)
    cfg = from_dict(CompareConfig, data)
    cfg.validate()
    return cfg


def experiment_label(cfg: CompareConfig) -> str:
    return tracking.experiment_name(cfg.experiment)


def search_filter(cfg: CompareConfig) -> str:
    # MLflow filters only know `and` (no parentheses, no `or`), so the user's clauses are simply appended.
    return f"{COMPLETE_RUNS} and {cfg.filter.strip()}" if cfg.filter.strip() else COMPLETE_RUNS


def build_report(cfg: CompareConfig) -> dashboards.Report:
    """The experiment's runs as tables and charts; a RealignError when there is nothing to compare."""
    runs = tracking.search_runs(cfg.experiment, search_filter(cfg))
    frame = dashboards.normalize_runs(runs)
    verdicts = Verdicts()
    labelled = dashboards.label_measures(frame)[0] if not frame.empty else frame
    pairs = paired_differences(labelled, verdicts) if not frame.empty else None
    report = dashboards.build_report(runs, pairs)
    if not frame.empty:
        table = ranking.realignment_table(labelled, verdicts, verdicts.correct)
        if not table.empty:
            report.tables["realignment"] = table
            report.charts.append(ranking.realignment_chart(table))
    from realign.stages.search_report import searches_in

    fronts, front_charts = searches_in(runs)
    if not fronts.empty:
        report.tables["search_fronts"] = fronts
        report.charts.extend(front_charts)
    if report.run_count == 0:
        matching = f" matching {cfg.filter!r}" if cfg.filter.strip() else ""
        raise RealignError(f"no finished realign runs to compare in experiment {experiment_label(cfg)!r}{matching} "
                           f"({tracking.tracking_uri()})",
                           "run a stage first (realign align --method dpo), or pass --experiment / --filter")
    return report


PAIRED_STAGES = ("attack", "expo", "fuse")


class Verdicts:
    """Each run's harmful-prompt verdicts by prompt id (its eval/generations.json), read once; `correct` gives
    the same table's task examples, right or wrong, by prompt id."""

    def __init__(self):
        self._rows: dict[str, list[dict] | None] = {}

    def _rows_of(self, run_id: str) -> list[dict] | None:
        if run_id not in self._rows:
            self._rows[run_id] = tracking.load_evaluation_rows(run_id)
        return self._rows[run_id]

    def __call__(self, run_id: str) -> dict[str, bool] | None:
        rows = self._rows_of(run_id)
        return None if rows is None else tracking.harmful_verdicts(run_id, rows)

    def correct(self, run_id: str) -> dict[str, bool] | None:
        rows = self._rows_of(run_id)
        return None if rows is None else tracking.task_correct(run_id, rows)


def paired_differences(frame, verdicts_of: Verdicts | None = None) -> "dashboards.pd.DataFrame":
    """Each attack, expo and fuse run against each input it was made from, over the prompts both answered.

    Only pairs measured alike (judge, prompt set, decoding) and both in `frame`; the verdicts are each run's
    eval/generations.json rows (kind harmful), matched by prompt_id.
    """
    from realign import stats

    by_id = frame.set_index("run_id")
    verdicts_of = verdicts_of or Verdicts()

    rows = []
    for _, run in frame[frame["stage"].isin(PAIRED_STAGES) & frame["harmful_score"].notna()].iterrows():
        for role in dashboards.PAIRED_ROLES:
            input_id = run.get(f"source_{role}", "")
            if not input_id or input_id not in by_id.index:
                continue
            source = by_id.loc[input_id]
            if _not_finite(source["harmful_score"]) or any(
                    run[tag] != source[tag] for tag in tracking.SCORE_IDENTITY_TAGS):
                continue
            mine, theirs = verdicts_of(run["run_id"]), verdicts_of(input_id)
            if not mine or not theirs:
                continue
            common = [pid for pid in mine if pid in theirs]
            if not common:
                continue
            result = stats.paired_difference([theirs[p] for p in common], [mine[p] for p in common])
            rows.append({
                "run": run["run_name"], "stage": run["stage"], "input": source["run_name"], "role": role,
                "measure": run["judge"], "n": result.n, "input_harmful_score": 100 * result.first_rate,
                "harmful_score": 100 * result.second_rate, "difference": 100 * result.difference,
                "difference ci95_low": 100 * result.ci95_low, "difference ci95_high": 100 * result.ci95_high,
                "p_value": result.p_value, "beyond_noise": result.excludes_zero,
                "run_id": run["run_id"], "input_run_id": input_id})
    return dashboards.paired_rows(rows)


def _not_finite(value) -> bool:
    try:
        return not float(value) == float(value)
    except (TypeError, ValueError):
        return True


def write_outputs(report: dashboards.Report, folder: Path, title: str) -> dict[str, list[Path]]:
    """dashboard.html, tables/<name>.csv|md and tables/runs.csv under `folder`; returns the files by kind."""
    tables_dir = folder / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"tables": [], "dashboard": []}
    for name, table in report.tables.items():
        csv_path, md_path = tables_dir / f"{name}.csv", tables_dir / f"{name}.md"
        table.to_csv(csv_path, index=False)  # full precision; a gap is an empty field
        md_path.write_text(dashboards.table_markdown(table) + "\n")
        files["tables"] += [csv_path, md_path]
    runs_path = tables_dir / "runs.csv"
    report.runs[["run_id", "run_name", "stage", "method", "base_model", "judge", "start_time"]].to_csv(
        runs_path, index=False)
    files["tables"].append(runs_path)
    dashboard = folder / "dashboard.html"
    dashboard.write_text(dashboards.dashboard_html(report, title, subtitle=f"tracking store {tracking.tracking_uri()}"))
    files["dashboard"].append(dashboard)
    return files


def _prepare(cfg: CompareConfig) -> tuple[dashboards.Report, str]:
    """The report (searched before the compare run opens), with its markdown printed."""
    report = build_report(cfg)
    title = f"realign compare: experiment {experiment_label(cfg)}"
    print(dashboards.report_markdown(report, title), flush=True)
    return report, title


def compare_body(run: tracking.StageRun, cfg: CompareConfig, prepared: tuple[dashboards.Report, str]) -> None:
    """Log the report: tables, figures (plotly JSON), the dashboard; and write them to `out` when given."""
    report, title = prepared
    models = sorted(set(report.runs["base_model"]) - {""})
    if len(models) == 1:
        run.set_tags({tracking.TAG_BASE_MODEL: models[0]})
    run.log_metrics({"runs_compared": report.run_count})
    files = write_outputs(report, run.workdir / "report", title)
    for path in files["tables"]:
        run.log_file(path, "tables")
    # The figures once as HTML (the dashboard, plotly.js embedded once) and each as plotly JSON
    # (plotly.io.read_json): an HTML file per figure would embed the 5 MB plotly.js every time.
    figures_dir = run.workdir / "report" / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for chart in report.charts:
        if chart.figure is not None:
            chart.figure.write_json(str(figures_dir / f"{chart.name}.json"))
            run.log_file(figures_dir / f"{chart.name}.json", "figures")
    run.log_file(files["dashboard"][0])
    if cfg.out:
        local = write_outputs(report, Path(cfg.out), title)
        print(f"dashboard: {local['dashboard'][0].resolve()}", file=sys.stderr)


COMPARE = register(Stage(
    "compare", CompareConfig, resolve_compare_config, compare_body, reusable=False, prepare=_prepare, run_name="compare",
    summary="The seed's tables (markdown on stdout, CSV) and plotly dashboards from an experiment's runs.",
))


def run_compare(overrides: dict[str, Any]) -> str:
    """Compare an experiment's finished runs; prints the markdown tables, returns the compare run's id."""
    return run_stage(COMPARE, overrides)
