"""The `realignment` ranking of compare on hand-made runs and verdicts: pooling per method, the paired numbers,
the accuracy budget and the order."""

import math

import pandas as pd
import pytest

from realign import ranking
from realign.tracking import SCORE_IDENTITY_TAGS


def _run(run_id, stage, method="", source="", harmful=50.0, accuracy=90.0, granularity="", mode="", **extra):
    row = {"run_id": run_id, "stage": stage, "method": method, "source_finetuned": source, "harmful_score": harmful,
           "finetune_accuracy": accuracy, "granularity": granularity, "fuse_mode": mode, "changed_fraction": 0.01,
           "seconds": 10.0, "benign_refusal_rate": 5.0, **extra}
    row.update({tag: "same" for tag in SCORE_IDENTITY_TAGS})
    return row


def _verdicts(harmful_ids, n=10):
    return {f"p{i}": i in harmful_ids for i in range(n)}


def test_methods_are_pooled_over_their_attacks_and_ranked_by_harm_removed_within_the_accuracy_budget():
    frame = pd.DataFrame([
        _run("a1", "attack", accuracy=90.0), _run("a2", "attack", accuracy=80.0),
        _run("r1", "fuse", "restore", "a1", accuracy=90.0, granularity="neurons", mode="full"),
        _run("r2", "fuse", "restore", "a2", accuracy=79.0, granularity="neurons", mode="full"),
        _run("t1", "fuse", "ties", "a1", accuracy=80.0, granularity="full", mode="full"),  # loses 10 points
        _run("s1", "fuse", "resta", "a1", accuracy=89.0, granularity="full", mode="full"),
    ])
    verdicts = {"a1": _verdicts({0, 1, 2, 3, 4, 5}), "a2": _verdicts({0, 1, 2, 3}),
                "r1": _verdicts({0, 1}), "r2": _verdicts({0, 1, 2, 3}),
                "t1": _verdicts(set()), "s1": _verdicts({0, 1, 2, 3, 4})}
    table = ranking.realignment_table(frame, verdicts.get)
    assert table["method"].tolist() == ["restore · neurons · full", "resta · full · full", "ties · full · full"]
    restore = table.iloc[0]
    # pooled over 20 (attack, prompt) pairs: 10 harmful before, 6 after
    assert restore["runs"] == 2 and restore["n"] == 20
    assert restore["attacked_harmful_score"] == pytest.approx(50.0) and restore["harmful_score"] == pytest.approx(30.0)
    assert restore["harm_removed"] == pytest.approx(20.0)
    assert restore["harm_removed ci95_low"] < 20.0 < restore["harm_removed ci95_high"]
    assert restore["accuracy_lost"] == pytest.approx(0.5) and restore["within_budget"]
    ties = table.iloc[2]
    assert ties["harm_removed"] == pytest.approx(60.0) and not ties["within_budget"], "best harm removal, but 10 points lost"
    assert table.iloc[1]["harm_removed"] == pytest.approx(10.0) and table.iloc[1]["p_value"] > 0.05
    assert not table.iloc[1]["beyond_noise"], "one prompt of ten is inside the noise"


def test_repairs_measured_otherwise_than_their_attack_are_left_out():
    attack = _run("a1", "attack")
    other = _run("f1", "fuse", "restore", "a1")
    other[SCORE_IDENTITY_TAGS[0]] = "another judge"
    table = ranking.realignment_table(pd.DataFrame([attack, other]), {"a1": _verdicts({1}), "f1": _verdicts(set())}.get)
    assert table.empty
    chart = ranking.realignment_chart(table)
    assert chart.figure is None and "evaluated alike" in chart.note


def test_the_chart_has_one_point_per_method_with_its_interval():
    frame = pd.DataFrame([_run("a1", "attack"), _run("f1", "fuse", "antidote", "a1", granularity="neurons", mode="full")])
    table = ranking.realignment_table(frame, {"a1": _verdicts({0, 1, 2}), "f1": _verdicts({0})}.get)
    chart = ranking.realignment_chart(table)
    trace = chart.figure.data[0]
    assert list(trace.text) == ["antidote · neurons · full"] and trace.y[0] == pytest.approx(20.0)
    assert math.isclose(trace.error_y.array[0], table["harm_removed ci95_high"][0] - 20.0)


def test_accuracy_lost_has_a_paired_interval_over_the_task_examples_both_answered():
    frame = pd.DataFrame([_run("a1", "attack", accuracy=100.0),
                          _run("f1", "fuse", "ties", "a1", accuracy=80.0, granularity="full", mode="full")])
    verdicts = {"a1": _verdicts({0, 1}), "f1": _verdicts(set())}
    # every example right before; examples 0 and 1 wrong after: b = 2 discordant pairs, c = 0
    correct = {"a1": _verdicts(set(range(10))), "f1": _verdicts(set(range(2, 10)))}
    row = ranking.realignment_table(frame, verdicts.get, correct.get).iloc[0]
    assert row["accuracy_lost"] == pytest.approx(20.0)
    assert row["accuracy_lost ci95_low"] < 20.0 < row["accuracy_lost ci95_high"]
    assert row["accuracy_lost ci95_low"] < 0.0, "two examples of ten are inside the noise"
    assert row["accuracy_p_value"] == pytest.approx(0.5)  # McNemar exact: 2 · (1/2)^2
    without = ranking.realignment_table(frame, verdicts.get).iloc[0]
    assert math.isnan(without["accuracy_lost ci95_low"]) and math.isnan(without["accuracy_p_value"])


def test_task_examples_are_read_as_right_or_wrong_only_where_the_task_scores_so():
    from realign.tracking import task_correct

    rows = [{"kind": "harmful", "prompt_id": "h", "flagged": True, "correct": None},
            {"kind": "sst2", "prompt_id": "x", "flagged": None, "correct": 1.0},
            {"kind": "sst2", "prompt_id": "y", "flagged": None, "correct": 0.0}]
    assert task_correct("unused", rows) == {"x": True, "y": False}
    rouge = [{"kind": "alpaca", "prompt_id": "z", "flagged": None, "correct": 0.42}]
    assert task_correct("unused", rouge) is None
