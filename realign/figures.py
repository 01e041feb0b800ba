"""The compare report's plotly figures, from the normalized runs frame of realign.dashboards: harmful score
against the attack's ratio and size and EXPO's α (with 95 % error bars), the fusion trade-off, the selection heat
maps, and the paired differences. Pure pandas and plotly; no MLflow."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from realign.dashboards import (FIGURE_HEIGHT, SELECTED_FRACTION, Chart, _attack_rows, _method_rank, _missing)


def _newest(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The newest run of each `keys` combination (missing key values group together)."""
    if rows.empty:
        return rows
    ordered = rows.sort_values("start_time", ascending=False, kind="stable")
    return ordered.drop_duplicates(subset=keys, keep="first")


def _trace_name(parts: dict[str, Any], shown: list[str]) -> str:
    words = []
    for name in shown:
        value = parts.get(name)
        if _missing(value) or value == "":
            continue
        if name == "ratio":
            words.append(f"p={value:g}")
        elif name == "size":
            words.append(f"n={value:g}")
        elif name == "judge":
            words.append(f"[{value}]")
        else:
            words.append(str(value))
    return " · ".join(words) or "runs"


def _harmful_axis(judges: list[str]) -> str:
    judged = [j for j in judges if j]
    return "harmful score (%)" + (f", judge: {judged[0]}" if len(judged) == 1 else "")


def _line_chart(name: str, title: str, points: pd.DataFrame, x: str, x_title: str, series: list[str],
                judges: list[str], note: str) -> Chart:
    """Harmful score against `x`, one line per `series` combination; missing y values are gaps in the line."""
    import plotly.graph_objects as go

    drawable = points[points[x].notna() & points["harmful_score"].notna()] if not points.empty else points
    if drawable.empty:
        return Chart(name, title, None, note)
    if drawable[x].nunique() < 2:  # a line over one x value says nothing the tables don't
        return Chart(name, title, None, f"every run has the same {x_title} ({drawable[x].iloc[0]:g}): "
                                        f"runs at two or more values draw this figure")
    varying = [k for k in series if points[k].nunique(dropna=False) > 1 or k == "method"]
    figure = go.Figure()
    for values, group in points.groupby(series, dropna=False, sort=False):
        group = group.sort_values(x)
        parts = dict(zip(series, values if isinstance(values, tuple) else (values,)))
        figure.add_trace(go.Scatter(
            x=group[x], y=group["harmful_score"], mode="lines+markers", name=_trace_name(parts, varying),
            error_y=_error_bars(group, "harmful_score"),
            customdata=np.stack([group["finetune_accuracy"], group["run_id"]], axis=-1),
            hovertemplate=f"{x_title}=%{{x}}<br>harmful score=%{{y}}<br>fine-tune accuracy=%{{customdata[0]}}"
                          "<br>run %{customdata[1]}<extra>%{fullData.name}</extra>"))
    figure.update_layout(title=title, xaxis_title=x_title, yaxis_title=_harmful_axis(judges), height=FIGURE_HEIGHT,
                         template="plotly_white", legend_title_text="")
    figure.update_yaxes(rangemode="tozero")  # a percentage: small differences should not look large
    return Chart(name, title, figure)


def _error_bars(rows: pd.DataFrame, metric: str) -> dict:
    """A plotly error_x/error_y spec from a rate's interval columns (no bar where the interval is missing)."""
    value = rows[metric]
    return {"type": "data", "symmetric": False, "visible": True,
            "array": (rows[f"{metric} ci95_high"] - value).fillna(0).clip(lower=0).tolist(),
            "arrayminus": (value - rows[f"{metric} ci95_low"]).fillna(0).clip(lower=0).tolist()}


def _fusion_chart(frame: pd.DataFrame, model: list[str], judges: list[str]) -> Chart:
    import plotly.graph_objects as go

    name, title = "fusion_tradeoff", "Fusion: harmful score vs fine-tune accuracy"
    fused = _newest(frame[frame["stage"] == "fuse"], [*model, "method", "granularity", "judge"])
    drawable = fused[fused["harmful_score"].notna() & fused["finetune_accuracy"].notna()] if not fused.empty else fused
    if drawable.empty:
        return Chart(name, title, None, "no fuse run with both harmful_score and finetune_accuracy: run "
                                        "`realign fuse` (with evaluation on)")
    series = [*model, "method", "judge"]
    varying = [k for k in series if fused[k].nunique() > 1 or k == "method"]
    figure = go.Figure()
    attacked = fused[["attacked_finetune_accuracy", "attacked_harmful_score"]].dropna().drop_duplicates()
    if not attacked.empty:  # where the fused models started from
        attacked = fused.loc[attacked.index]
        figure.add_trace(go.Scatter(
            x=attacked["attacked_finetune_accuracy"], y=attacked["attacked_harmful_score"], mode="markers",
            error_y=_error_bars(attacked, "attacked_harmful_score"),
            error_x=_error_bars(attacked, "attacked_finetune_accuracy"),
            name="attacked (before fusion)", marker={"size": 11, "symbol": "x", "color": "#555"},
            hovertemplate="attacked model<br>fine-tune accuracy=%{x}<br>harmful score=%{y}<extra></extra>"))
    for values, group in fused.groupby(series, sort=False):
        parts = dict(zip(series, values))
        figure.add_trace(go.Scatter(
            x=group["finetune_accuracy"], y=group["harmful_score"], mode="markers+text", text=group["granularity"],
            error_y=_error_bars(group, "harmful_score"), error_x=_error_bars(group, "finetune_accuracy"),
            textposition="top center", marker={"size": 11}, name=_trace_name(parts, varying),
            customdata=group[["run_id"]].to_numpy(),
            hovertemplate="fine-tune accuracy=%{x}<br>harmful score=%{y}<br>%{text}<br>run %{customdata[0]}"
                          "<extra>%{fullData.name}</extra>"))
    figure.update_layout(title=title, xaxis_title="fine-tune accuracy (%)", yaxis_title=_harmful_axis(judges),
                         height=FIGURE_HEIGHT, template="plotly_white", legend_title_text="")
    figure.update_yaxes(rangemode="tozero")
    return Chart(name, title, figure)


def _layer_index(column: str) -> int | None:
    match = re.fullmatch(rf"{SELECTED_FRACTION}layer_(\d+)", column)
    return int(match.group(1)) if match else None


def _heatmap_chart(frame: pd.DataFrame, model: list[str], by: str) -> Chart:
    """Share of weights each score run selected, per layer or per module (its selected_fraction/* metrics)."""
    import plotly.graph_objects as go

    name, title = f"selection_by_{by}", f"Safety-critical weights selected, by {by}"
    scored = _newest(frame[frame["stage"] == "score"], [*model, "method"])
    columns = [c for c in frame.columns if c.startswith(SELECTED_FRACTION)]
    if by == "layer":
        columns = sorted((c for c in columns if _layer_index(c) is not None), key=_layer_index)
        x_labels = [str(_layer_index(c)) for c in columns]
    else:
        columns = sorted(c for c in columns if _layer_index(c) is None)
        x_labels = [c[len(SELECTED_FRACTION):] for c in columns]
    if scored.empty or not columns or scored[columns].isna().all().all():
        return Chart(name, title, None, f"no score run logged selected_fraction/<{by}> metrics: run `realign score`")
    scored = scored.loc[sorted(scored.index, key=lambda i: _method_rank(scored.at[i, "method"]))]
    y_labels = [" · ".join(str(row[k]) for k in [*model, "method"]) for _, row in scored.iterrows()]
    z = scored[columns].to_numpy(dtype=float)
    figure = go.Figure(go.Heatmap(
        z=z, x=x_labels, y=y_labels, colorscale="Viridis", zmin=0, zmax=float(np.nanmax(z)),
        colorbar={"title": {"text": "selected"}},
        hovertemplate=f"{by} %{{x}}<br>%{{y}}<br>selected fraction=%{{z}}<extra></extra>"))
    figure.update_layout(title=title, xaxis_title=by, yaxis_title="score method", height=FIGURE_HEIGHT,
                         template="plotly_white")
    figure.update_xaxes(type="category")
    return Chart(name, title, figure)


def build_charts(frame: pd.DataFrame, judges: list[str]) -> list[Chart]:
    model = ["base_model"] if frame["base_model"].nunique() > 1 else []
    attacks = _newest(_attack_rows(frame), [*model, "method", "task", "ratio", "size", "judge"])
    expos = _newest(frame[frame["stage"] == "expo"], [*model, "method", "alpha", "judge"])
    no_attack = "no attack run with a harmful_score: run `realign attack --ratio 0.1 --size 100`"
    return [
        _line_chart("harmful_vs_ratio", "Harmful score vs harmful ratio p, per alignment method", attacks, "ratio",
                    "harmful ratio p", [*model, "method", "task", "size", "judge"], judges, no_attack),
        _line_chart("harmful_vs_size", "Harmful score vs fine-tuning size n, per alignment method", attacks, "size",
                    "fine-tuning size n", [*model, "method", "task", "ratio", "judge"], judges, no_attack),
        _line_chart("harmful_vs_alpha", "EXPO: harmful score vs α", expos, "alpha", "α",
                    [*model, "method", "judge"], judges,
                    "no expo run with a harmful_score: run `realign expo --alpha 0.1,0.3,0.5,0.9`"),
        _fusion_chart(frame, model, judges),
        _heatmap_chart(frame, model, "layer"),
        _heatmap_chart(frame, model, "module"),
    ]


def paired_chart(pairs: pd.DataFrame) -> Chart:
    import plotly.graph_objects as go

    name, title = "paired_differences", "Paired differences in harmful score (run − input), 95 % intervals"
    drawable = pairs[pairs["difference"].notna()] if not pairs.empty else pairs
    if drawable.empty:
        return Chart(name, title, None, "no run and input answered the same prompts with the same measure")
    labels = [f"{r} vs {role} ({i})" for r, role, i in zip(drawable["run"], drawable["role"], drawable["input"])]
    figure = go.Figure()
    for beyond, group_name, symbol in ((True, "interval excludes 0", "circle"),
                                       (False, "within the noise", "circle-open")):
        part = drawable["beyond_noise"] == beyond
        if not part.any():
            continue
        group = drawable[part]
        figure.add_trace(go.Scatter(
            x=group["difference"], y=[label for label, keep in zip(labels, part) if keep], mode="markers",
            name=group_name, marker={"size": 11, "symbol": symbol},
            error_x={"type": "data", "symmetric": False, "array": group["difference ci95_high"] - group["difference"],
                     "arrayminus": group["difference"] - group["difference ci95_low"]},
            customdata=np.stack([group["p_value"], group["n"]], axis=-1),
            hovertemplate="difference=%{x:.1f} points<br>McNemar p=%{customdata[0]:.3g}<br>n=%{customdata[1]}"
                          "<extra>%{y}</extra>"))
    figure.add_vline(x=0, line_dash="dot", line_color="#888")
    # The legend says what a filled and an open marker mean, even when only one kind is present.
    figure.update_layout(title=title, xaxis_title="harmful score difference (points)", height=FIGURE_HEIGHT,
                         template="plotly_white", legend_title_text="", showlegend=True)
    return Chart(name, title, figure)
