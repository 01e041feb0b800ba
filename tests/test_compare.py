"""`compare` on synthetic runs hand-logged into a temp store: every table value is a logged metric, gaps stay gaps."""

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param

from realign import dashboards, tracking
from realign.cli import main
from realign.stage_configs import CompareConfig
from realign.errors import RealignError
from realign.stages.compare import build_report, run_compare

EXPERIMENT = "realign"
T0 = 1_700_000_000_000  # ms; each run starts one minute after the previous one, so "newest" is unambiguous


class RunLogger:
    """Logs finished realign runs with explicit start times, the way the stages tag them."""

    def __init__(self, experiment: str = EXPERIMENT):
        self.client = mlflow.MlflowClient()
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.minute = 0

    def log(self, name: str, stage: str, method: str, metrics: dict | None = None, params: dict | None = None,
            tags: dict | None = None, judge: str = "classifier", status: str = "FINISHED", complete: bool = True,
            base_model: str = "smollm2-135m", parent: str | None = None) -> str:
        self.minute += 1
        start = T0 + self.minute * 60_000
        all_tags = {tracking.TAG_STAGE: stage, tracking.TAG_METHOD: method, tracking.TAG_BASE_MODEL: base_model,
                    **({tracking.TAG_JUDGE: judge} if judge else {}),
                    **({tracking.TAG_COMPLETE: "true"} if complete else {}),
                    **({"mlflow.parentRunId": parent} if parent else {}), **(tags or {})}
        run = self.client.create_run(self.experiment_id, start_time=start, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), start, 0) for k, v in (metrics or {}).items()],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])
        self.client.set_terminated(run_id, status=status, end_time=start + 1000)
        return run_id


def log_synthetic_runs(logger: RunLogger) -> dict[str, str]:
    """A small chain with known numbers: align, attacks (one duplicate, one gap), an EXPO sweep, score, fuse,
    plus runs that must be left out (FAILED, incomplete, evaluate)."""
    ids = {}
    ids["sft"] = logger.log("align/sft", "align", "sft", {"harmful_score": 30.0})
    ids["dpo"] = logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0}, tags={"realign.source.sft": ids["sft"]})
    ids["kto"] = logger.log("align/kto", "align", "kto", {"harmful_score": 8.0})

    def attack(source: str, method: str, ratio: float, size: int, metrics: dict, **kw) -> str:
        return logger.log(f"attack/{method}/sst2/p{ratio:g}/n{size}", "attack", method, metrics,
                          params={"task": "sst2", "ratio": ratio, "size": size},
                          tags={"realign.source.aligned": source, tracking.TAG_TASK: "sst2"}, **kw)

    ids["dpo_p01_old"] = attack(ids["dpo"], "dpo", 0.1, 100, {"harmful_score": 99.0, "finetune_accuracy": 11.0})
    ids["dpo_p01"] = attack(ids["dpo"], "dpo", 0.1, 100, {"harmful_score": 20.0, "finetune_accuracy": 95.0})
    ids["dpo_p02"] = attack(ids["dpo"], "dpo", 0.2, 100, {"harmful_score": 35.0, "finetune_accuracy": 93.0})
    ids["dpo_n200"] = attack(ids["dpo"], "dpo", 0.1, 200, {"harmful_score": 25.0})  # no finetune_accuracy: a gap
    ids["sft_p01"] = attack(ids["sft"], "sft", 0.1, 100, {"harmful_score": 40.0, "finetune_accuracy": 94.0})
    ids["failed"] = attack(ids["dpo"], "dpo", 0.3, 100, {"harmful_score": 77.0}, status="FAILED", complete=False)
    ids["incomplete"] = attack(ids["dpo"], "dpo", 0.4, 100, {"harmful_score": 88.0}, complete=False)
    ids["evaluate"] = logger.log("evaluate/align/dpo", "evaluate", "classifier", {"harmful_score": 66.0})

    ids["sweep"] = logger.log("expo/dpo/sweep", "expo", "dpo", params={"alpha": "0.1,0.5"},
                              tags={tracking.TAG_SWEEP: "alpha"}, judge="")
    for alpha, score in ((0.5, 3.0), (0.1, 4.0)):  # logged out of order: the figure sorts by α
        ids[f"expo_{alpha:g}"] = logger.log(f"expo/dpo/a{alpha:g}", "expo", "dpo",
                                            {"harmful_score": score, "finetune_accuracy": 90.0 + alpha},
                                            params={"alpha": f"{alpha:g}"}, parent=ids["sweep"])
    ids["expo_0.9"] = logger.log("expo/dpo/a0.9", "expo", "dpo", {"harmful_score": 2.0, "finetune_accuracy": 89.0},
                                 params={"alpha": "0.9"})

    ids["wanda"] = logger.log("score/wanda", "score", "wanda", {
        "selected_count": 1200, "harmful_score": 5.0, "harmful_score_zeroed_selected": 70.0, "harmful_score_zeroed_random": 6.0,
        "selected_fraction/layer_0": 0.02, "selected_fraction/layer_1": 0.05, "selected_fraction/layer_10": 0.01,
        "selected_fraction/q_proj": 0.03, "selected_fraction/down_proj": 0.04})
    ids["snip"] = logger.log("score/snip", "score", "snip", {
        "selected_count": 800, "selected_fraction/layer_0": 0.01, "selected_fraction/q_proj": 0.02})
    ids["restore"] = logger.log("fuse/restore/neurons", "fuse", "restore",
                                {"harmful_score": 6.0, "finetune_accuracy": 92.0, "changed_fraction": 0.01,
                                 "attacked_harmful_score": 20.0, "attacked_finetune_accuracy": 95.0},
                                params={"fuse.granularity": "neurons"})
    # No fuse.granularity param: the run name (fuse/<method>/<granularity>) says it.
    ids["ties"] = logger.log("fuse/ties/full", "fuse", "ties", {"harmful_score": 15.0, "finetune_accuracy": 94.5,
                                                                 "attacked_harmful_score": 20.0,
                                                                 "attacked_finetune_accuracy": 95.0})
    return ids


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test uses experiments of its own."""
    folder = tmp_path_factory.mktemp("compare-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        ids = log_synthetic_runs(RunLogger())
    return {"uri": uri, "ids": ids}


@pytest.fixture
def store(module_store, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_store["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(module_store["uri"])
    yield module_store
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def synthetic(store):
    """The synthetic chain's run ids, in experiment `realign`."""
    return store["ids"]


def _row(table: pd.DataFrame, **keys) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for key, value in keys.items():
        mask &= table[key].isna() if value is None else table[key] == value
    rows = table[mask]
    assert len(rows) == 1, f"{keys}: {len(rows)} rows in\n{table}"
    return rows.iloc[0]


def test_alignment_table_holds_the_newest_logged_values_with_gaps_and_notes(synthetic):
    report = build_report(CompareConfig())
    table = report.tables["alignment"]
    assert list(table.columns) == ["method", "task", "ratio", "size", "harmful_score aligned",
                                   "harmful_score attacked", "finetune_accuracy attacked", "note"]
    assert list(table["method"]) == ["sft", "dpo", "dpo", "dpo", "kto"], "seed's method order, then setting"

    dpo = _row(table, method="dpo", ratio=0.1, size=100)
    assert (dpo["harmful_score aligned"], dpo["harmful_score attacked"], dpo["finetune_accuracy attacked"]) == (
        5.0, 20.0, 95.0), "the newer of the two p=0.1 attacks"
    assert dpo["note"] == "newest of 2: harmful_score attacked, finetune_accuracy attacked"
    assert _row(table, method="dpo", ratio=0.2, size=100)["harmful_score attacked"] == 35.0
    gap = _row(table, method="dpo", ratio=0.1, size=200)
    assert gap["harmful_score attacked"] == 25.0 and math.isnan(gap["finetune_accuracy attacked"])
    sft = _row(table, method="sft", ratio=0.1, size=100)
    assert (sft["harmful_score aligned"], sft["harmful_score attacked"]) == (30.0, 40.0)
    kto = _row(table, method="kto", ratio=None)  # never attacked: the aligned score alone
    assert kto["harmful_score aligned"] == 8.0 and math.isnan(kto["harmful_score attacked"])


def test_failed_incomplete_evaluate_and_sweep_parent_runs_are_left_out(synthetic):
    report = build_report(CompareConfig())
    compared = set(report.runs["run_id"])
    for left_out in ("failed", "incomplete", "evaluate", "sweep"):
        assert synthetic[left_out] not in compared, left_out
    assert set(report.tables["alignment"]["ratio"].dropna()) == {0.1, 0.2}
    assert 66.0 not in set(report.tables["alignment"]["harmful_score attacked"])
    assert report.judges == ["classifier"]


def test_expo_fusion_and_score_tables(synthetic):
    tables = build_report(CompareConfig()).tables
    expo = tables["expo"]
    assert list(expo.columns) == ["method", "alpha", "harmful_score", "finetune_accuracy", "note"]
    assert list(expo["alpha"]) == [0.1, 0.5, 0.9] and list(expo["harmful_score"]) == [4.0, 3.0, 2.0]
    assert list(expo["finetune_accuracy"]) == [90.1, 90.5, 89.0]

    fusion = tables["fusion"]
    assert list(fusion.columns) == ["method", "granularity", "harmful_score", "finetune_accuracy", "changed_fraction",
                                    "attacked_harmful_score", "attacked_finetune_accuracy", "note"]
    assert list(fusion["method"]) == ["ties", "restore"]  # the DESIGN's order of fusion methods
    restore = _row(fusion, method="restore")
    assert (restore["granularity"], restore["harmful_score"], restore["finetune_accuracy"]) == ("neurons", 6.0, 92.0)
    assert (restore["attacked_harmful_score"], restore["attacked_finetune_accuracy"]) == (20.0, 95.0)
    ties = _row(fusion, method="ties")
    assert ties["granularity"] == "full" and math.isnan(ties["changed_fraction"])

    score = tables["score"]
    wanda = _row(score, method="wanda")
    assert list(score.columns) == ["method", "selected_count", "harmful_score", "harmful_score_zeroed_selected",
                                   "harmful_score_zeroed_random", "note"]
    assert (wanda["selected_count"], wanda["harmful_score"], wanda["harmful_score_zeroed_selected"],
            wanda["harmful_score_zeroed_random"]) == (1200.0, 5.0, 70.0, 6.0)
    assert math.isnan(_row(score, method="snip")["harmful_score_zeroed_selected"])


def test_figures_plot_the_logged_values(synthetic):
    charts = {chart.name: chart for chart in build_report(CompareConfig()).charts}
    assert list(charts) == ["harmful_vs_ratio", "harmful_vs_size", "harmful_vs_alpha", "fusion_tradeoff",
                            "selection_by_layer", "selection_by_module", "paired_differences"]
    assert all(chart.figure is not None for name, chart in charts.items() if name != "paired_differences")
    assert charts["paired_differences"].figure is None, "these synthetic runs logged no per-prompt verdicts"

    ratio = {trace.name: (list(trace.x), list(trace.y)) for trace in charts["harmful_vs_ratio"].figure.data}
    assert ratio["dpo · n=100"] == ([0.1, 0.2], [20.0, 35.0])
    assert ratio["sft · n=100"] == ([0.1], [40.0])
    size = {trace.name: (list(trace.x), list(trace.y)) for trace in charts["harmful_vs_size"].figure.data}
    assert size["dpo · p=0.1"] == ([100.0, 200.0], [20.0, 25.0])
    (alpha,) = charts["harmful_vs_alpha"].figure.data
    assert (list(alpha.x), list(alpha.y)) == ([0.1, 0.5, 0.9], [4.0, 3.0, 2.0])
    fusion = {trace.name: (list(trace.x), list(trace.y)) for trace in charts["fusion_tradeoff"].figure.data}
    assert fusion == {"restore": ([92.0], [6.0]), "ties": ([94.5], [15.0]),
                      "attacked (before fusion)": ([95.0], [20.0])}, "the shared attacked model drawn once"

    (layers,) = charts["selection_by_layer"].figure.data
    assert list(layers.x) == ["0", "1", "10"] and list(layers.y) == ["snip", "wanda"]
    assert layers.z[1].tolist() == [0.02, 0.05, 0.01]
    assert layers.z[0][0] == 0.01 and math.isnan(layers.z[0][1]), "a layer snip did not log is a gap"
    (modules,) = charts["selection_by_module"].figure.data
    assert list(modules.x) == ["down_proj", "q_proj"] and modules.z[1].tolist() == [0.04, 0.03]


def test_mixed_judges_split_harmful_score_columns(store):
    logger = RunLogger("mixed-judges")
    dpo = logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0}, judge="classifier")
    for ratio in (0.1, 0.2):
        for judge, score in (("classifier", 20.0 + ratio), ("keyword", 70.0 + ratio)):
            logger.log(f"attack/dpo/sst2/p{ratio:g}/n100", "attack", "dpo",
                       {"harmful_score": score, "finetune_accuracy": 95},
                       params={"task": "sst2", "ratio": ratio, "size": 100}, tags={"realign.source.aligned": dpo},
                       judge=judge)
    report = build_report(CompareConfig(experiment="mixed-judges"))
    table = report.tables["alignment"]
    assert report.judges == ["classifier", "keyword"]
    assert list(table.columns) == ["method", "task", "ratio", "size", "harmful_score aligned [classifier]",
                                   "harmful_score attacked [classifier]", "harmful_score attacked [keyword]",
                                   "finetune_accuracy attacked", "note"]
    row = _row(table, ratio=0.1)
    assert (row["harmful_score attacked [classifier]"], row["harmful_score attacked [keyword]"]) == (20.1, 70.1)
    charts = {chart.name: chart for chart in report.charts}
    lines = {trace.name: list(trace.y) for trace in charts["harmful_vs_ratio"].figure.data}
    assert lines == {"dpo · [classifier]": [20.1, 20.2], "dpo · [keyword]": [70.1, 70.2]}
    assert charts["harmful_vs_size"].figure is None, "one size only: no line to draw"
    assert charts["harmful_vs_size"].note.startswith("every run has the same fine-tuning size n (100)")


def test_several_base_models_get_a_base_model_column(store):
    logger = RunLogger("two-models")
    logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0}, base_model="smollm2-135m")
    logger.log("align/dpo", "align", "dpo", {"harmful_score": 1.0}, base_model="llama3-8b")
    table = build_report(CompareConfig(experiment="two-models")).tables["alignment"]
    assert list(table.columns[:2]) == ["base_model", "method"]
    assert dict(zip(table["base_model"], table["harmful_score aligned"])) == {"smollm2-135m": 5.0, "llama3-8b": 1.0}


def test_filter_narrows_the_runs_and_a_bad_filter_is_one_line(synthetic):
    report = build_report(CompareConfig(filter="tags.`realign.stage` = 'expo'"))
    assert set(report.runs["stage"]) == {"expo"} and report.tables["alignment"].empty
    with pytest.raises(RealignError, match="cannot search runs with filter"):
        build_report(CompareConfig(filter="tags.realign.stage ==="))


def test_markdown_and_csv_show_gaps(synthetic, tmp_path):
    report = build_report(CompareConfig())
    markdown = dashboards.report_markdown(report, "t")
    assert "| dpo | sst2 | 0.1 | 200 | 5 | 25 | — |" in markdown
    assert "| kto | — | — | — | 8 | — | — |" in markdown
    csv = report.tables["alignment"].to_csv(index=False)
    assert "dpo,sst2,0.1,200.0,5.0,25.0,," in csv


def test_compare_run_logs_tables_figures_and_dashboard(synthetic, tmp_path, capsys):
    out = tmp_path / "report"
    run_id = run_compare({"experiment": EXPERIMENT, "out": str(out)})

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "compare"
    assert run.data.tags[tracking.TAG_COMPLETE] == "true" and run.data.tags["mlflow.runName"] == "compare"
    assert run.data.tags[tracking.TAG_BASE_MODEL] == "smollm2-135m"
    client = mlflow.MlflowClient()
    artifacts = {f.path for folder in ("", "tables", "figures") for f in client.list_artifacts(run_id, folder or None)}
    for name in ("alignment", "expo", "fusion", "score"):
        assert {f"tables/{name}.csv", f"tables/{name}.md"} <= artifacts
    assert {"tables/runs.csv", "dashboard.html", "figures/harmful_vs_ratio.json", "figures/harmful_vs_alpha.json",
            "figures/fusion_tradeoff.json", "figures/selection_by_layer.json"} <= artifacts

    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="tables/alignment.csv"))
    assert _row(logged, method="dpo", ratio=0.1, size=100)["harmful_score attacked"] == 20.0
    page = (out / "dashboard.html").read_text()
    assert page.count("plotly.js v") == 1 and "<script src" not in page, "plotly.js embedded once, nothing fetched"
    assert page.count('class="plotly-graph-div"') == 6
    assert (out / "tables" / "expo.csv").is_file() and (out / "tables" / "alignment.md").is_file()
    assert "| method | task | ratio | size |" in capsys.readouterr().out

    # A second compare compares the same runs: compare runs are never inputs.
    again = run_compare({"experiment": EXPERIMENT})
    assert mlflow.get_run(again).data.metrics["runs_compared"] == run.data.metrics["runs_compared"] == 15


def test_empty_figures_are_skipped_with_a_note(store):
    RunLogger("align-only").log("align/dpo", "align", "dpo", {"harmful_score": 5.0})
    report = build_report(CompareConfig(experiment="align-only"))
    assert all(chart.figure is None and chart.note for chart in report.charts)
    page = dashboards.dashboard_html(report, "t")
    assert "plotly-graph-div" not in page and page.count("not drawn: ") == 7  # 6 figures and the paired one
    assert report.tables["expo"].empty and "no expo runs" in dashboards.report_markdown(report, "t")


def test_cli_prints_tables_and_fails_with_one_line_when_there_are_no_runs(store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["compare", "--experiment", "nothing-here"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no finished realign runs to compare" in result.output
    assert mlflow.get_experiment_by_name("nothing-here") is None, "no run (nor experiment) left behind"

    RunLogger("cli").log("align/dpo", "align", "dpo", {"harmful_score": 5.0})
    result = runner.invoke(main, ["compare", "--experiment", "cli", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| dpo | — | — | — | 5 | — | — |" in result.output
    assert (tmp_path / "out" / "dashboard.html").is_file()


def test_each_compare_searches_its_own_experiment(store):
    RunLogger("other").log("align/kto", "align", "kto", {"harmful_score": 8.0})
    run_compare({"experiment": EXPERIMENT})  # its stage run makes `realign` MLflow's active experiment
    report = build_report(CompareConfig(experiment="other"))
    assert list(report.runs["method"]) == ["kto"]


def test_under_mlflow_run_the_run_it_created_names_the_experiment(store, monkeypatch):
    logger = RunLogger("chosen-by-mlflow-run")
    logger.log("align/orpo", "align", "orpo", {"harmful_score": 9.0})
    created = logger.client.create_run(logger.experiment_id, run_name="mlflow-run").info.run_id  # RUNNING
    # What `mlflow run --experiment-name chosen-by-mlflow-run` hands the entry point's process.
    monkeypatch.setenv("MLFLOW_RUN_ID", created)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", logger.experiment_id)
    mlflow.set_experiment(experiment_id=logger.experiment_id)

    assert run_compare({}) == created  # the experiment option keeps its default, realign
    run = mlflow.get_run(created)
    assert run.info.status == "FINISHED" and run.data.metrics["runs_compared"] == 1
    assert run.data.tags["mlflow.runName"] == "compare"


def test_notebook_runs_top_to_bottom_on_the_experiment(synthetic, monkeypatch):
    """notebooks/compare.ipynb executed as a user would, against the synthetic experiment."""
    import nbformat
    from nbclient import NotebookClient

    notebook_dir = Path(__file__).resolve().parents[1] / "notebooks"
    notebook = nbformat.read(notebook_dir / "compare.ipynb", as_version=4)
    monkeypatch.setenv("REALIGN_EXPERIMENT", "realign")  # the kernel inherits MLFLOW_TRACKING_URI too
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook_dir)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "finished runs in experiment 'realign'" in text and "nothing to compare" not in text
    rich = [out for out in outputs if out.output_type in ("display_data", "execute_result")]
    assert any("application/vnd.plotly.v1+json" in out.get("data", {}) for out in rich), "figures shown"
    assert any("text/html" in out.get("data", {}) for out in rich), "tables shown"


def _log_verdicts(client, run_id, flags):
    """An eval/generations.json with harmful rows p0, p1, ... flagged as given (and one benign row)."""
    prompts = [f"harmful prompt {i}" for i in range(len(flags))]
    client.log_table(run_id, data={"kind": ["harmful"] * len(flags) + ["benign"],
                                   "prompt_id": [f"p{i}" for i in range(len(flags))] + ["b0"],
                                   "prompt": prompts + ["a benign one"], "flagged": list(flags) + [None]},
                     artifact_file="eval/generations.json")


MEASURE = {tracking.TAG_JUDGE_HASH: "aaaa1111", tracking.TAG_PROMPTS: "builtin:test",
           tracking.TAG_PROMPTS_DIGEST: "dddd", tracking.TAG_DECODING: "greedy,max_new_tokens=48"}


def test_paired_differences_pair_each_run_with_its_inputs_over_the_shared_prompts(store):
    logger = RunLogger("paired")
    # The aligned model flags 2 of 40 prompts; the attack flags 22 of them (20 new); a repair brings it to 4.
    aligned = [i < 2 for i in range(40)]
    attacked = [i < 22 for i in range(40)]
    repaired = [i < 4 for i in range(40)]
    dpo = logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0}, tags=MEASURE)
    attack = logger.log("attack/dpo/sst2/p0.1/n100", "attack", "dpo", {"harmful_score": 55.0},
                        params={"task": "sst2", "ratio": 0.1, "size": 100},
                        tags={**MEASURE, "realign.source.aligned": dpo})
    fuse = logger.log("fuse/restore/neurons", "fuse", "restore", {"harmful_score": 10.0, "finetune_accuracy": 90.0},
                      tags={**MEASURE, "realign.source.finetuned": attack, "realign.source.reference": dpo})
    other = logger.log("fuse/ties/full", "fuse", "ties", {"harmful_score": 1.0},
                       tags={**MEASURE, tracking.TAG_JUDGE: "keyword", "realign.source.finetuned": attack})
    for run_id, flags in ((dpo, aligned), (attack, attacked), (fuse, repaired), (other, aligned)):
        _log_verdicts(logger.client, run_id, flags)
    report = build_report(CompareConfig(experiment="paired"))
    paired = report.tables["paired"]
    assert len(paired) == 3, paired  # the keyword-judged fuse run is measured otherwise: not paired
    attack_row = _row(paired, run_id=attack, role="aligned")
    assert attack_row["n"] == 40 and attack_row["difference"] == pytest.approx(50.0)
    assert attack_row["p_value"] == pytest.approx(2 / 2**20) and attack_row["beyond_noise"]
    assert attack_row["difference ci95_low"] > 0
    repair = _row(paired, run_id=fuse, role="finetuned")
    assert repair["difference"] == pytest.approx(-45.0) and repair["beyond_noise"]
    versus_reference = _row(paired, run_id=fuse, role="reference")
    assert versus_reference["difference"] == pytest.approx(5.0) and not versus_reference["beyond_noise"]
    assert versus_reference["p_value"] == pytest.approx(0.5)  # b = 0, c = 2: 2 · 1/4
    chart = next(c for c in report.charts if c.name == "paired_differences")
    assert chart.figure is not None and {t.name for t in chart.figure.data} == {"interval excludes 0",
                                                                                "within the noise"}
    markdown = dashboards.report_markdown(report, "t")
    assert "## paired" in markdown and "beyond_noise" in markdown


def test_tables_and_figures_carry_the_intervals(store):
    logger = RunLogger("intervals")
    dpo = logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0, "harmful_score_ci95_low": 2.0,
                                                   "harmful_score_ci95_high": 11.0}, tags=MEASURE)
    for ratio, score in ((0.1, 20.0), (0.2, 30.0)):
        logger.log(f"attack/dpo/sst2/p{ratio}/n100", "attack", "dpo",
                   {"harmful_score": score, "harmful_score_ci95_low": score - 6, "harmful_score_ci95_high": score + 7,
                    "finetune_accuracy": 90.0, "finetune_accuracy_ci95_low": 85.0,
                    "finetune_accuracy_ci95_high": 94.0},
                   params={"task": "sst2", "ratio": ratio, "size": 100}, tags={**MEASURE, "realign.source.aligned": dpo})
    report = build_report(CompareConfig(experiment="intervals"))
    row = _row(report.tables["alignment"], ratio=0.2)
    assert row["harmful_score attacked ci95_low"] == 24.0 and row["harmful_score attacked ci95_high"] == 37.0
    assert row["harmful_score aligned ci95_high"] == 11.0 and row["finetune_accuracy attacked ci95_low"] == 85.0
    chart = next(c for c in report.charts if c.name == "harmful_vs_ratio")
    (trace,) = chart.figure.data
    assert list(trace.error_y.array) == [7.0, 7.0] and list(trace.error_y.arrayminus) == [6.0, 6.0]


def test_a_harmful_score_without_a_judge_is_left_out_in_one_line(store):
    logger = RunLogger("unjudged")
    logger.log("align/dpo", "align", "dpo", {"harmful_score": 5.0}, tags=MEASURE)
    logger.log("align/kto", "align", "kto", {"harmful_score": 9.0}, judge="")
    report = build_report(CompareConfig(experiment="unjudged"))
    assert report.run_count == 1
    assert report.left_out.startswith("left out 1 run(s) whose harmful score records no judge") and "align/kto" in \
        report.left_out
    assert report.left_out in dashboards.report_markdown(report, "t")


def test_scores_measured_differently_get_columns_of_their_own(store):
    logger = RunLogger("measures")
    for method, digest in (("dpo", "dddd"), ("kto", "eeee")):
        logger.log(f"align/{method}", "align", method, {"harmful_score": 5.0},
                   tags={**MEASURE, tracking.TAG_PROMPTS_DIGEST: digest})
    report = build_report(CompareConfig(experiment="measures"))
    columns = [c for c in report.tables["alignment"].columns if c.startswith("harmful_score aligned [")]
    assert sorted(c for c in columns if "ci95" not in c) == ["harmful_score aligned [classifier·dddd]",
                                                            "harmful_score aligned [classifier·eeee]"]
