"""The seed's tables and plotly figures from a DataFrame of realign runs; pure pandas and plotly, no MLflow.

The input is what `mlflow.search_runs` returns (columns run_id, status, start_time, tags.*, params.*, metrics.*),
so a notebook can pass its own search. Everything is read from tags, params and metrics:

- A run counts when it is FINISHED and tagged `realign.complete=true`. Sweep parents (`realign.sweep`) only
  summarize their child runs and are skipped; so are evaluate runs (their numbers are copied onto the run they
  evaluated) and compare/pipeline runs.
- A table cell holds one run's value. Several runs in one cell (the same setting run twice): the newest run
  (start_time) is shown and the row's `note` says "newest of N". The newest, not a mean: every number in a
  table is then one run's, which the MLflow UI shows under the same name.
- A metric that a run did not log is a gap: NaN in the DataFrame, empty in CSV, "—" in markdown and HTML.
- Harmful scores measured differently do not compare. A score's measure is its judge (name, content hash and
  threshold), its prompt set (digest) and its decoding (the realign.judge*, realign.prompts*, realign.decoding
  tags); when a table's runs were measured in several ways, each harmful-score column is split per measure, named
  by what differs, e.g. `harmful_score attacked [keyword]`. A run with a harmful score but no judge is left out,
  and `left_out` says so in one line.
- Every rate comes with its 95 % interval (`<column> ci95_low`, `<column> ci95_high`); figures draw them as error
  bars. `paired` holds, for each attack, expo and fuse run against each input it was made from, the difference in
  harmful score over the prompts both answered, its paired 95 % interval and McNemar's exact p-value; the paired
  figure marks the differences whose interval excludes 0.
- Runs of several base models: every table row and figure trace carries its base model.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from realign.tracking import (SCORE_IDENTITY_TAGS, TAG_BASE_MODEL, TAG_COMPLETE, TAG_JUDGE, TAG_METHOD, TAG_SOURCE,
                              TAG_STAGE, TAG_SWEEP, TAG_TASK)

COMPARED_STAGES = ("align", "attack", "expo", "score", "fuse")
# Display order of method names (the DESIGN's order of each family); others follow alphabetically.
METHOD_ORDER = ("sft", "dpo", "orpo", "kto", "simpo",
                "snip", "wanda", "set_difference", "actsvd",
                "average", "task_arithmetic", "ties", "consensus_ta", "consensus_ties", "consensus_ties_authors",
                "restore", "resta", "antidote", "safe_lora", "safemerge")
GAP = "—"
HARMFUL = "harmful_score"  # every column whose name contains this is a judged number
SELECTED_FRACTION = "selected_fraction/"
FIGURE_HEIGHT = 460

TABLE_CAPTIONS = {
    "alignment": "Harmful score of each alignment method, aligned and after the harmful fine-tuning attack "
                 "(task, harmful ratio p, size n), with the attacked model's fine-tune accuracy. 'aligned' is the "
                 "run the attack started from; methods never attacked have one row with the aligned score only.",
    "expo": "EXPO (model extrapolation): harmful score and fine-tune accuracy per α.",
    "fusion": "Fusion: harmful score, fine-tune accuracy and the share of weights changed, per fusion method and "
              "region granularity; attacked_* are the attacked model's numbers before fusion (same judge).",
    "score": "Safety-critical weights: how many were selected, and the harmful score of the scored model as it is, "
             "with the selected weights zeroed, and with as many random weights zeroed.",
    "paired": "Paired differences in harmful score (run minus its input, in points) over the prompts both answered, "
              "with Newcombe's paired 95 % interval and McNemar's exact p-value; `beyond_noise` is true when the "
              "interval excludes 0. Only runs measured alike (judge, prompt set, decoding) are paired.",
}
# The inputs a run is paired with: attack and expo against the aligned run, expo against the SFT run too, fuse
# against the attacked (finetuned) model and the safety reference.
PAIRED_ROLES = ("aligned", "sft", "finetuned", "reference")
RATES = ("harmful_score", "finetune_accuracy", "harmful_score_zeroed_selected", "harmful_score_zeroed_random",
         "attacked_harmful_score", "attacked_finetune_accuracy")


@dataclass
class Chart:
    """One figure of the dashboard; `figure` is None when the runs hold nothing to draw (then `note` says why)."""

    name: str  # file stem: figures/<name>.json in the compare run
    title: str
    figure: Any | None  # plotly.graph_objects.Figure
    note: str = ""


@dataclass
class Report:
    tables: dict[str, pd.DataFrame]  # name -> table, in display order
    charts: list[Chart]
    runs: pd.DataFrame  # the runs compared, normalized (one row per run)
    judges: list[str]  # the measures of the harmful scores (a judge's name, plus what else differs)
    left_out: str = ""  # one line: the runs left out and why

    @property
    def run_count(self) -> int:
        return len(self.runs)


# ---------------------------------------------------------------------------------------------------------------
# Runs -> one normalized frame


def _text(runs: pd.DataFrame, column: str) -> pd.Series:
    if column not in runs:
        return pd.Series("", index=runs.index, dtype=object)
    return runs[column].map(lambda v: "" if _missing(v) else str(v))


def _number(runs: pd.DataFrame, column: str) -> pd.Series:
    if column not in runs:
        return pd.Series(np.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[column], errors="coerce").astype(float)


def _seconds(runs: pd.DataFrame) -> pd.Series:
    """Each run's wall time (end − start), NaN where either is missing."""
    if "start_time" not in runs or "end_time" not in runs:
        return pd.Series(np.nan, index=runs.index)
    start, end = pd.to_datetime(runs["start_time"], utc=True), pd.to_datetime(runs["end_time"], utc=True)
    return (end - start).dt.total_seconds()


def normalize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per compared run, with plain columns: stage, method, judge, ratio, harmful_score, ...

    Only FINISHED, complete runs of the compared stages; sweep parents are dropped.
    """
    if runs is None or runs.empty or "run_id" not in runs:
        return pd.DataFrame(columns=["run_id", "start_time", "stage", "method", "judge", "base_model"])
    params_task = _text(runs, "params.task")
    frame = pd.DataFrame({
        "run_id": runs["run_id"].astype(str),
        "start_time": pd.to_datetime(runs["start_time"], utc=True) if "start_time" in runs else pd.NaT,
        "status": _text(runs, "status"),
        "complete": _text(runs, f"tags.{TAG_COMPLETE}"),
        "sweep": _text(runs, f"tags.{TAG_SWEEP}"),
        "stage": _text(runs, f"tags.{TAG_STAGE}"),
        "method": _text(runs, f"tags.{TAG_METHOD}"),
        "judge": _text(runs, f"tags.{TAG_JUDGE}"),
        "base_model": _text(runs, f"tags.{TAG_BASE_MODEL}"),
        "run_name": _text(runs, "tags.mlflow.runName"),
        "source_aligned": _text(runs, f"tags.{TAG_SOURCE}aligned"),
        **{f"source_{role}": _text(runs, f"tags.{TAG_SOURCE}{role}") for role in PAIRED_ROLES[1:]},
        # The attack's fine-tuning task is its `task` param; the tag names the task it was evaluated on.
        "task": params_task.where(params_task != "", _text(runs, f"tags.{TAG_TASK}")),
        "ratio": _number(runs, "params.ratio"),
        "size": _number(runs, "params.size"),
        "alpha": _number(runs, "params.alpha"),  # a sweep parent's list parses to NaN; parents are dropped anyway
        "granularity": _text(runs, "params.fuse.granularity"),  # the region the fuse run used; "full" = none
        "adapter": _text(runs, "params.adapter"),  # attack: new, or continue (the source's own adapter trained on)
        "fuse_mode": _text(runs, "params.fuse.mode"),  # full (merged weights) or lora (adapter factors)
        "seconds": _seconds(runs),
        "benign_refusal_rate": _number(runs, "metrics.benign_refusal_rate"),
    }, index=runs.index)
    for tag in SCORE_IDENTITY_TAGS:
        frame[tag] = _text(runs, f"tags.{tag}")
    for metric in ("changed_fraction", "selected_count", *RATES):
        frame[metric] = _number(runs, f"metrics.{metric}")
    for metric in RATES:
        for bound in ("ci95_low", "ci95_high"):
            frame[f"{metric} {bound}"] = _number(runs, f"metrics.{metric}_{bound}")
    for column in runs.columns:
        if column.startswith(f"metrics.{SELECTED_FRACTION}"):
            frame[column[len("metrics."):]] = _number(runs, column)
    # A fuse run is named fuse/<method>/<granularity>: the name says it when the param is missing.
    named = frame["run_name"].str.split("/")
    from_name = named.map(lambda parts: parts[2] if len(parts) > 2 and parts[0] == "fuse" else "")
    frame["granularity"] = frame["granularity"].where(frame["granularity"] != "", from_name)

    keep = ((frame["status"] == "FINISHED") & (frame["complete"] == "true") & (frame["sweep"] == "")
            & frame["stage"].isin(COMPARED_STAGES))
    return frame[keep].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Cells -> tables


def _missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _key(value: Any) -> Any:
    """A row-key value that compares equal to itself (NaN does not): missing keys become None."""
    return None if _missing(value) else value


def _method_rank(method: str) -> tuple[int, str]:
    base = method.split("+")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def _row_sort_key(key: tuple, names: list[str]) -> tuple:
    parts = []
    for name, value in zip(names, key):
        if name == "method":
            parts.append((0, _method_rank(value or "")))
        elif value is None:
            parts.append((1, ""))  # missing keys last
        else:
            parts.append((0, value))
    return tuple(parts)


def _judged(column: str) -> bool:
    return HARMFUL in column


def _label(column: str, judge: str, mixed_judges: bool) -> str:
    return f"{column} [{judge}]" if mixed_judges and judge and _judged(column) else column


def cells_to_table(cells: list[dict], row_keys: list[str], columns: list[str]) -> pd.DataFrame:
    """One row per distinct row key; one column per entry of `columns` (split per judge when judges are mixed).

    `cells` holds one dict per (run, column): the row keys, `column`, `judge`, `value`, `run_id`, `start_time`.
    The newest run fills a cell; `note` names the cells that had several runs.
    """
    if not cells:
        return pd.DataFrame(columns=[*row_keys, *columns, "note"])
    judges = {c["judge"] for c in cells if _judged(c["column"]) and c["judge"]}
    mixed = len(judges) > 1
    newest: dict[tuple, dict] = {}  # (row key, label) -> the newest cell
    run_ids: dict[tuple, set[str]] = {}
    for cell in cells:
        key = (tuple(_key(cell[k]) for k in row_keys), _label(cell["column"], cell["judge"], mixed))
        run_ids.setdefault(key, set()).add(cell["run_id"])
        if key not in newest or cell["start_time"] > newest[key]["start_time"]:
            newest[key] = cell

    present = {label for _, label in newest}
    labels: list[str] = []
    for column in columns:  # each column, or its per-judge splits in judge order; a column nobody filled stays
        split = sorted(label for label in present if label.startswith(f"{column} ["))
        labels += ([column] if column in present or not split else []) + split
    rows: dict[tuple, dict] = {}
    repeated: dict[tuple, dict[int, list[str]]] = {}  # row -> {number of runs: the cells that had that many}
    for (row, label), cell in newest.items():
        rows.setdefault(row, dict(zip(row_keys, row)))[label] = cell["value"]
        count = len(run_ids[(row, label)])
        if count > 1 and " ci95_" not in label:  # an interval goes with its value: the value's note says it
            repeated.setdefault(row, {}).setdefault(count, []).append(label)
    ordered = sorted(rows, key=lambda row: _row_sort_key(row, row_keys))
    records = [{**rows[row], "note": "; ".join(f"newest of {count}: {', '.join(cells)}"
                                               for count, cells in sorted(repeated.get(row, {}).items()))}
               for row in ordered]
    table = pd.DataFrame.from_records(records, columns=[*row_keys, *labels, "note"])
    for label in labels:
        table[label] = pd.to_numeric(table[label], errors="coerce").astype(float)
    return table


def _cell(keys: dict, column: str, value: Any, judge: str, run_id: str, start_time) -> dict:
    return {**keys, "column": column, "judge": judge, "value": value, "run_id": run_id, "start_time": start_time}


def _source_label(source: pd.Series) -> str:
    """The model an attack started from: its alignment method, marked when it was an EXPO model."""
    if source["stage"] == "expo":
        alpha = f" α={source['alpha']:g}" if not _missing(source["alpha"]) else ""
        return f"{source['method']}+expo{alpha}"
    return source["method"]


def _attack_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Attack runs with `method` = the model they attacked (align method, or <method>+expo α) and that source."""
    sources = frame[frame["stage"].isin(("align", "expo"))].set_index("run_id")
    attacks = frame[frame["stage"] == "attack"].copy()
    attacks["source_found"] = attacks["source_aligned"].isin(sources.index)
    attacks["method"] = [
        (_source_label(sources.loc[src]) if found else method) + ("+continue" if adapter == "continue" else "")
        for src, found, method, adapter in zip(attacks["source_aligned"], attacks["source_found"], attacks["method"],
                                               attacks["adapter"])]
    return attacks


def alignment_table(frame: pd.DataFrame, with_base_model: bool = False) -> pd.DataFrame:
    keys = (["base_model"] if with_base_model else []) + ["method", "task", "ratio", "size"]
    sources = frame[frame["stage"].isin(("align", "expo"))].set_index("run_id")
    cells: list[dict] = []
    attacked: set[tuple[str, str]] = set()
    for _, attack in _attack_rows(frame).iterrows():
        row = {k: attack[k] for k in keys}
        attacked.add((attack["base_model"], attack["method"]))
        run_id, start = attack["run_id"], attack["start_time"]
        cells += _rate_cells(row, "harmful_score", "attacked", attack, attack["judge"], run_id, start)
        cells += _rate_cells(row, "finetune_accuracy", "attacked", attack, "", run_id, start)
        if attack["source_found"]:
            source = sources.loc[attack["source_aligned"]]
            # Dated by the attack, so the newest attack of a cell brings its own source's score.
            cells += _rate_cells(row, "harmful_score", "aligned", source, source["judge"], attack["source_aligned"],
                                 start)
    for _, align in frame[frame["stage"] == "align"].iterrows():
        if (align["base_model"], align["method"]) in attacked:
            continue
        row = {**{k: align[k] for k in keys}, "task": None, "ratio": None, "size": None}
        cells += _rate_cells(row, "harmful_score", "aligned", align, align["judge"], align["run_id"],
                             align["start_time"])
    return cells_to_table(cells, keys, with_intervals(["harmful_score aligned", "harmful_score attacked",
                                                       "finetune_accuracy attacked"]))


def _rate_cells(row: dict, metric: str, role: str, run: pd.Series, judge: str, run_id: str, start) -> list[dict]:
    """The cells of one rate of one run: its value and its interval, as `<metric> <role>[ ci95_low|ci95_high]`."""
    return [_cell(row, f"{metric} {role}{suffix}", run[f"{metric}{suffix}"], judge, run_id, start)
            for suffix in ("", " ci95_low", " ci95_high")]


def with_intervals(columns: list[str]) -> list[str]:
    """Each rate column followed by its interval columns."""
    out = []
    for column in columns:
        out.append(column)
        if column.split(" ")[0] in RATES:
            out += [f"{column} ci95_low", f"{column} ci95_high"]
    return out


def _simple_table(frame: pd.DataFrame, stage: str, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    metrics = with_intervals(metrics)
    cells = []
    for _, run in frame[frame["stage"] == stage].iterrows():
        row = {k: run[k] for k in keys}
        cells += [_cell(row, metric, run[metric], run["judge"] if _judged(metric) else "", run["run_id"],
                        run["start_time"]) for metric in metrics]
    return cells_to_table(cells, keys, metrics)


def build_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The seed's tables from normalized runs: alignment (aligned and attacked), expo, fusion, score."""
    several_models = frame["base_model"].nunique() > 1
    model = ["base_model"] if several_models else []
    tables = {
        "alignment": alignment_table(frame, several_models),
        "expo": _simple_table(frame, "expo", [*model, "method", "alpha"], ["harmful_score", "finetune_accuracy"]),
        # attacked_*: the attacked model's numbers, which a fuse run copies when the same judge made them.
        "fusion": _simple_table(frame, "fuse", [*model, "method", "granularity"],
                                ["harmful_score", "finetune_accuracy", "changed_fraction", "attacked_harmful_score",
                                 "attacked_finetune_accuracy"]),
        # harmful_score: the scored model as it is; then with the selected weights zeroed, and as many random ones.
        "score": _simple_table(frame, "score", [*model, "method"],
                               ["selected_count", "harmful_score", "harmful_score_zeroed_selected",
                                "harmful_score_zeroed_random"]),
    }
    # Interval columns no run filled (runs made before realign logged intervals) are left out.
    return {name: table.drop(columns=[c for c in table.columns if " ci95_" in c and table[c].isna().all()])
            for name, table in tables.items()}


# ---------------------------------------------------------------------------------------------------------------
# Measures and the report (figures: realign.figures)


def label_measures(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """`judge` becomes the measure of each run's harmful score: the judge's name, plus whatever else differs
    between the measures present (content hash, threshold, prompt set, decoding). Runs that have a harmful score
    but no judge are dropped; the second value says so in one line ("" when none is)."""
    scored = frame["harmful_score"].notna()
    unjudged = frame[scored & (frame[TAG_JUDGE] == "")]
    frame = frame.drop(unjudged.index).reset_index(drop=True)
    scored = frame["harmful_score"].notna()
    identities = frame.loc[scored, list(SCORE_IDENTITY_TAGS)].drop_duplicates()
    varying = [tag for tag in SCORE_IDENTITY_TAGS[1:] if identities[tag].nunique() > 1
               and identities.groupby(TAG_JUDGE)[tag].nunique().max() > 1]

    def label(row: pd.Series) -> str:
        parts = [row[TAG_JUDGE]] + [_measure_part(tag, row[tag]) for tag in varying]
        return "·".join(parts)

    frame["judge"] = [label(row) if has_score else row[TAG_JUDGE]
                      for (_, row), has_score in zip(frame.iterrows(), scored)]
    left_out = ""
    if not unjudged.empty:
        names = ", ".join(unjudged["run_name"].tolist()[:5]) + (" …" if len(unjudged) > 5 else "")
        left_out = (f"left out {len(unjudged)} run(s) whose harmful score records no judge (made before realign "
                    f"recorded it): {names}")
    return frame, left_out


def _measure_part(tag: str, value: str) -> str:
    if not value:
        return "?"
    if tag in ("realign.judge_hash", "realign.prompts_digest"):
        return value[:6]
    return value


def build_report(runs: pd.DataFrame, pairs: pd.DataFrame | None = None) -> Report:
    """Tables and charts from `mlflow.search_runs`' DataFrame (any runs: the unusable ones are dropped here).

    `pairs`: paired differences as `paired_rows` makes them (the compare stage reads the runs' verdicts).
    """
    frame = normalize_runs(runs)
    if frame.empty:
        return Report(tables={}, charts=[], runs=frame, judges=[])
    frame, left_out = label_measures(frame)
    judges = sorted({judge for judge in frame.loc[frame["harmful_score"].notna(), "judge"] if judge})
    from realign.figures import build_charts, paired_chart

    tables = build_tables(frame)
    charts = build_charts(frame, judges)
    if pairs is not None:
        tables["paired"] = pairs
        charts.append(paired_chart(pairs))
    return Report(tables=tables, charts=charts, runs=frame, judges=judges, left_out=left_out)


PAIRED_COLUMNS = ["run", "stage", "input", "role", "measure", "n", "input_harmful_score", "harmful_score",
                  "difference", "difference ci95_low", "difference ci95_high", "p_value", "beyond_noise",
                  "run_id", "input_run_id"]


def paired_rows(rows: list[dict]) -> pd.DataFrame:
    """The `paired` table from one dict per (run, input) with the PAIRED_COLUMNS (rates and differences in points)."""
    table = pd.DataFrame.from_records(rows, columns=PAIRED_COLUMNS)
    return table.sort_values(["stage", "run", "role"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Output: markdown, CSV, one self-contained HTML page


def format_value(value: Any) -> str:
    """Four significant digits, no exponent; a missing value is the gap mark."""
    if _missing(value):
        return GAP
    if isinstance(value, (float, np.floating)):
        return np.format_float_positional(float(value), precision=4, unique=False, fractional=False, trim="-")
    return str(value)


def table_markdown(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return format_value(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def judge_line(report: Report) -> str:
    if not report.judges:
        return "harmful scores: no judge recorded"
    if len(report.judges) == 1:
        return f"harmful scores judged by: {report.judges[0]}"
    return f"harmful scores judged by: {', '.join(report.judges)} (columns split per judge)"


def report_markdown(report: Report, title: str) -> str:
    parts = [f"# {title}", "", f"{report.run_count} runs; {judge_line(report)}; several runs in one cell: the "
                               "newest is shown and `note` says so.", ""]
    if report.left_out:
        parts += [report.left_out, ""]
    for name, table in report.tables.items():
        parts += [f"## {name}", "", TABLE_CAPTIONS.get(name, ""), ""]
        parts += [table_markdown(table) if not table.empty else f"no {name} runs", ""]
    return "\n".join(parts)


def _table_html(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
                   for row in table.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


DASHBOARD_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #777; font-style: italic; } .caption { color: #444; max-width: 60rem; }
.figure { margin-bottom: 2rem; }
"""


def dashboard_html(report: Report, title: str, subtitle: str = "") -> str:
    """One self-contained page: the tables, then every chart; plotly.js embedded once, so it opens offline."""
    from plotly.offline import get_plotlyjs

    sections = [f"<h1>{html.escape(title)}</h1>",
                f"<p>{html.escape(subtitle)}</p>" if subtitle else "",
                f"<p>{report.run_count} runs; {html.escape(judge_line(report))}; several runs in one cell: the newest "
                "is shown and <code>note</code> says so. A gap (—) is a metric the run did not log.</p>",
                f"<p class='note'>{html.escape(report.left_out)}</p>" if report.left_out else "",
                "<h2>Tables</h2>"]
    for name, table in report.tables.items():
        sections.append(f"<h3>{html.escape(name)}</h3><p class='caption'>{html.escape(TABLE_CAPTIONS.get(name, ''))}</p>")
        sections.append(_table_html(table) if not table.empty else f"<p class='note'>no {html.escape(name)} runs</p>")
    sections.append("<h2>Figures</h2>")
    for chart in report.charts:
        if chart.figure is None:
            sections.append(f"<h3>{html.escape(chart.title)}</h3><p class='note'>not drawn: {html.escape(chart.note)}</p>")
            continue
        div = chart.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{chart.name}",
                                   default_height=f"{FIGURE_HEIGHT}px", config={"displaylogo": False})
        sections.append(f"<div class='figure'>{div}</div>")
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            f"<title>{html.escape(title)}</title>\n<style>{DASHBOARD_STYLE}</style>\n"
            "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
            f"<script>{get_plotlyjs()}</script>\n</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n")
