"""The `realignment` table and figure of `compare`: every repair method that ran on an experiment's attacks, ranked.

A repair is a fuse run; its method label is the method with its region and form (`restore · neurons · lora`), so
NLSR's two paths rank apart. Per label, over all its runs (one per attack it repaired):
- harmful score before → after, as a pooled paired comparison: each (attack, prompt) answered by the attacked
  model and by its repair is one pair (`realign.stats.paired_difference`: Newcombe's interval, McNemar's p). The
  attacks share their prompts, so the pairs are not fully independent; per-attack rows are the `paired` table;
- fine-tune accuracy before → after and the points lost (mean over its runs), with a paired interval and McNemar's
  p over the (attack, test example) pairs where the task is scored right or wrong (`accuracy_lost ci95_*`; NaN for
  a mean score such as alpaca's ROUGE-L), benign over-refusal after, the share of weights changed, seconds per run.
Sorted: methods that lose at most `ACCURACY_BUDGET` points of fine-tune accuracy first, each group by harm removed
(the seed's claim is a repair that costs at most 2 points).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from realign import stats
from realign.tracking import SCORE_IDENTITY_TAGS

ACCURACY_BUDGET = 2.0  # points of fine-tune accuracy a repair may lose and still rank in the first group

COLUMNS = ["method", "runs", "n", "attacked_harmful_score", "harmful_score", "harm_removed",
           "harm_removed ci95_low", "harm_removed ci95_high", "p_value", "beyond_noise",
           "attacked_finetune_accuracy", "finetune_accuracy", "accuracy_lost", "accuracy_lost ci95_low",
           "accuracy_lost ci95_high", "accuracy_p_value", "within_budget",
           "benign_refusal_rate", "changed_fraction", "seconds"]


def method_label(run: pd.Series) -> str:
    parts = [run["method"], run.get("granularity", "") or "full", run.get("fuse_mode", "")]
    return " · ".join(part for part in parts if part)


def realignment_table(frame: pd.DataFrame, verdicts_of: Callable[[str], dict[str, bool] | None],
                      correct_of: Callable[[str], dict[str, bool] | None] | None = None) -> pd.DataFrame:
    """One row per repair method (COLUMNS; rates in points), from normalized, measure-labelled runs.

    `verdicts_of(run_id)`: harmful verdicts by prompt id; `correct_of(run_id)`: task examples right or wrong by
    prompt id (without it, or where a run has none, accuracy lost has no interval)."""
    by_id = frame.set_index("run_id")
    pooled: dict[str, dict] = {}
    fuses = frame[(frame["stage"] == "fuse") & frame["harmful_score"].notna()]
    for _, run in fuses.iterrows():
        attack_id = run.get("source_finetuned", "")
        if not attack_id or attack_id not in by_id.index:
            continue
        attack = by_id.loc[attack_id]
        if any(run[tag] != attack[tag] for tag in SCORE_IDENTITY_TAGS):
            continue  # measured differently: no paired comparison
        mine, theirs = verdicts_of(run["run_id"]), verdicts_of(attack_id)
        common = [pid for pid in (mine or {}) if pid in (theirs or {})]
        if not common:
            continue
        entry = pooled.setdefault(method_label(run), {"before": [], "after": [], "runs": [],
                                                      "correct_before": [], "correct_after": [], "unpaired": False})
        entry["before"] += [theirs[p] for p in common]
        entry["after"] += [mine[p] for p in common]
        entry["runs"].append((run, attack))
        right_after = correct_of(run["run_id"]) if correct_of else None
        right_before = correct_of(attack_id) if correct_of else None
        shared = [pid for pid in (right_after or {}) if pid in (right_before or {})]
        if shared:
            entry["correct_before"] += [right_before[p] for p in shared]
            entry["correct_after"] += [right_after[p] for p in shared]
        else:
            entry["unpaired"] = True  # one run without paired task examples: no interval for the method
    rows = [_row(label, entry) for label, entry in pooled.items()]
    table = pd.DataFrame.from_records(rows, columns=COLUMNS)
    if table.empty:
        return table
    order = table.assign(_group=~table["within_budget"].astype(bool), _harm=-table["harm_removed"])
    return table.loc[order.sort_values(["_group", "_harm", "method"], kind="stable").index].reset_index(drop=True)


def _mean(values: list) -> float:
    finite = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def _row(label: str, entry: dict) -> dict:
    result = stats.paired_difference(entry["before"], entry["after"])
    runs = entry["runs"]
    accuracy_before = _mean([attack["finetune_accuracy"] for _, attack in runs])
    accuracy_after = _mean([run["finetune_accuracy"] for run, _ in runs])
    lost = accuracy_before - accuracy_after
    nan = float("nan")
    lost_low = lost_high = accuracy_p = nan
    if entry.get("correct_before") and not entry.get("unpaired"):
        accuracy = stats.paired_difference(entry["correct_before"], entry["correct_after"])
        # accuracy lost = before − after: the paired difference (after − before), negated
        lost_low, lost_high, accuracy_p = -100 * accuracy.ci95_high, -100 * accuracy.ci95_low, accuracy.p_value
    return {
        "method": label, "runs": len(runs), "n": result.n,
        "attacked_harmful_score": 100 * result.first_rate, "harmful_score": 100 * result.second_rate,
        # harm removed = before − after, so its interval is the paired difference's, negated
        "harm_removed": -100 * result.difference, "harm_removed ci95_low": -100 * result.ci95_high,
        "harm_removed ci95_high": -100 * result.ci95_low, "p_value": result.p_value,
        "beyond_noise": result.excludes_zero,
        "attacked_finetune_accuracy": accuracy_before, "finetune_accuracy": accuracy_after, "accuracy_lost": lost,
        "accuracy_lost ci95_low": lost_low, "accuracy_lost ci95_high": lost_high, "accuracy_p_value": accuracy_p,
        "within_budget": bool(np.isfinite(lost) and lost <= ACCURACY_BUDGET),  # unknown accuracy ranks after
        "benign_refusal_rate": _mean([run.get("benign_refusal_rate") for run, _ in runs]),
        "changed_fraction": _mean([run.get("changed_fraction") for run, _ in runs]),
        "seconds": _mean([run.get("seconds") for run, _ in runs]),
    }


def realignment_chart(table: pd.DataFrame):
    """Harm removed (paired 95 % interval) against fine-tune accuracy lost, one point per repair method."""
    import plotly.graph_objects as go

    from realign.dashboards import FIGURE_HEIGHT, Chart

    name, title = "realignment", "Repairs: harm removed vs fine-tune accuracy lost (95 % paired intervals)"
    if table.empty:
        return Chart(name, title, None, "no fuse run was evaluated alike with the attack it repaired")
    figure = go.Figure(go.Scatter(
        x=table["accuracy_lost"], y=table["harm_removed"], mode="markers+text", text=table["method"],
        textposition="top center", marker={"size": 11},
        error_y={"type": "data", "symmetric": False, "array": table["harm_removed ci95_high"] - table["harm_removed"],
                 "arrayminus": table["harm_removed"] - table["harm_removed ci95_low"]},
        customdata=np.stack([table["p_value"], table["n"], table["runs"]], axis=-1),
        hovertemplate="%{text}<br>harm removed=%{y:.1f} points<br>accuracy lost=%{x:.1f} points<br>"
                      "McNemar p=%{customdata[0]:.3g}<br>n=%{customdata[1]} over %{customdata[2]} attack(s)<extra></extra>"))
    figure.add_hline(y=0, line_dash="dot", line_color="#888")
    figure.add_vline(x=ACCURACY_BUDGET, line_dash="dash", line_color="#c0392b",
                     annotation_text=f"{ACCURACY_BUDGET:g} points lost")
    figure.update_layout(title=title, xaxis_title="fine-tune accuracy lost (points)",
                         yaxis_title="harmful score removed (points)", height=FIGURE_HEIGHT, template="plotly_white")
    return Chart(name, title, figure)
