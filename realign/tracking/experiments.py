"""Where runs go (`experiment_name`), experiments got-or-created race-free, and the lookups of finished runs
(the newest of a stage, a reusable one, a run's verdicts and adapter lineage)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


from realign import distributed
from realign.errors import RealignError
from realign.tracking.store import _mlflow, _one_line, client, code_version, is_transient, note, open_store, store_call, store_error
from realign.tracking.tags import DEFAULT_EXPERIMENT, TAG_ADAPTER_INIT, TAG_BASE_MODEL, TAG_CODE_VERSION, TAG_COMPLETE, TAG_METHOD, TAG_OUTPUT, TAG_SOURCE, TAG_STAGE



def project_run_id() -> str | None:
    """The run `mlflow run` opened for this process (MLFLOW_RUN_ID), if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def experiment_name(requested: str = "") -> str:
    """The experiment a stage's runs go to and its default inputs are looked up in.

    Under `mlflow run`: the one it chose (`--experiment-name`, else its default); a different explicit
    `experiment` is refused. Otherwise `requested` (--experiment), else $MLFLOW_EXPERIMENT_NAME, else `realign`.
    """
    project = project_run_id()
    if project:
        chosen = experiment_of(project)
        if requested and requested != chosen:
            raise RealignError(f"experiment {requested!r} differs from the one `mlflow run` chose ({chosen!r})",
                               f"drop -P experiment and pass --experiment-name {requested} to mlflow run")
        return chosen
    return requested or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def get_or_create_experiment(name: str) -> str:
    """The id of experiment `name`, created if missing; the loser of a create race uses the winner's."""
    from realign.tracking import ui

    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client._client.create_experiment(name, tags=ui.experiment_tags(name))
        except Exception as err:
            experiment = mlflow_client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                if is_transient(err):
                    raise store_error(err) from None
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RealignError(f"experiment {name!r} was deleted", f"restore it (mlflow experiments restore "
                           f"--experiment-id {experiment.experiment_id}) or pass another --experiment")
    describe_experiment(experiment)
    return experiment.experiment_id


def describe_experiment(experiment) -> None:
    """Give an experiment made elsewhere (by `mlflow run`, by hand, by an older realign) the description and saved
    view a new one starts with; what it has already is kept."""
    from realign.tracking import ui

    for key, value in ui.experiment_tags(experiment.name).items():
        if key not in experiment.tags:
            client().set_experiment_tag(experiment.experiment_id, key, value)


def search_runs(experiment: str = "", filter_string: str = ""):
    """The runs of `experiment` (see `experiment_name`) that match `filter_string`, newest first, as MLflow's
    pandas DataFrame.

    One row per run; columns run_id, status, start_time, tags.*, params.*, metrics.* (latest values). An
    experiment that does not exist gives an empty frame.
    """
    import pandas as pd

    mlflow = _mlflow()
    open_store()
    experiment_id = _experiment_id(experiment)
    if experiment_id is None:
        return pd.DataFrame()
    try:
        return store_call(mlflow.search_runs, experiment_ids=[experiment_id], filter_string=filter_string,
                          order_by=["attributes.start_time DESC"], output_format="pandas")
    except RealignError:
        raise
    except Exception as err:  # a malformed filter is the user's typo, not a crash
        raise RealignError(f"cannot search runs with filter {filter_string!r}: {_one_line(err)[:200]}",
                           "write an MLflow filter such as tags.`realign.base_model` = 'smollm2-135m'") from None


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of run `run_id` (e.g. an input run's evaluation, shown next to a result)."""
    return dict(client().get_run(run_id).data.metrics)


def load_run_table(run_id: str, artifact_file: str):
    """A table a run logged with `log_table` (e.g. a search's search/pareto.json) as a pandas DataFrame; empty
    when the run logged none."""
    experiment_id = store_call(client().get_run, run_id).info.experiment_id
    return store_call(client().load_table, experiment_id, artifact_file, run_ids=[run_id])


def load_evaluation_rows(run_id: str) -> list[dict] | None:
    """The rows of a run's own evaluation table (eval/generations.json); None when it logged none."""
    import json

    folder = Path(tempfile.mkdtemp(prefix="realign-verdicts-"))
    try:
        try:
            path = store_call(_mlflow().artifacts.download_artifacts, run_id=run_id,
                              artifact_path="eval/generations.json", dst_path=str(folder))
        except RealignError:
            raise
        except Exception:
            return None
        table = json.loads(Path(path).read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    columns = table.get("columns", [])
    return [dict(zip(columns, row)) for row in table.get("data", [])]


def harmful_verdicts(run_id: str, rows: list[dict] | None = None) -> dict[str, bool] | None:
    """prompt_id -> flagged for the harmful prompts of a run's own evaluation (eval/generations.json); None
    when it logged none. `rows`: that table's rows, when already read."""
    from realign.data.prompts import prompt_id

    rows = load_evaluation_rows(run_id) if rows is None else rows
    if rows is None:
        return None
    return {row.get("prompt_id") or prompt_id(row["prompt"]): bool(row["flagged"])
            for row in rows if row.get("kind") == "harmful" and row.get("flagged") is not None}


def task_correct(run_id: str, rows: list[dict] | None = None) -> dict[str, bool] | None:
    """prompt_id -> correct for the task test examples of a run's own evaluation, where the task is scored as
    right or wrong (label word, final answer); None when it logged none or scores otherwise (alpaca's ROUGE-L)."""
    from realign.data.prompts import prompt_id

    rows = load_evaluation_rows(run_id) if rows is None else rows
    task_rows = [row for row in rows or [] if row.get("kind") not in (None, "harmful", "benign")
                 and row.get("correct") is not None]
    if not task_rows or any(float(row["correct"]) not in (0.0, 1.0) for row in task_rows):
        return None
    return {row.get("prompt_id") or prompt_id(row["prompt"]): float(row["correct"]) == 1.0 for row in task_rows}


def adapter_root(run_id: str) -> str:
    """The run whose freshly initialised LoRA this run's adapter descends from: an attack that continued an
    adapter (realign.adapter_init) descends from its source, an expo run in lora mode from the aligned run it
    scaled, a fuse run in lora mode from its finetuned run; any other run is its own root. Two adapters share
    A/B coordinates only when they share a root."""
    seen = set()
    while run_id not in seen:
        seen.add(run_id)
        tags = client().get_run(run_id).data.tags
        parent = tags.get(TAG_ADAPTER_INIT, "")
        if not parent and tags.get(TAG_OUTPUT) == "adapter":
            parent = {"expo": tags.get(f"{TAG_SOURCE}aligned", ""),
                      "fuse": tags.get(f"{TAG_SOURCE}finetuned", "")}.get(tags.get(TAG_STAGE, ""), "")
        if not parent:
            return run_id
        run_id = parent
    return run_id


def latest_run(stage: str, base_model: str, method: str | None = None, experiment: str = "",
               note_elsewhere: bool = True) -> str | None:
    """The newest FINISHED and complete run of `stage` (and `method`) for `base_model` in `experiment`, or None.

    When there is none but the `realign` experiment has one, a note on stderr says how to use it (for a caller
    about to train one instead; `note_elsewhere=False` for one that fails and says it in its error). Under
    `accelerate launch` the main process looks and every process gets its answer.
    """
    return distributed.agree(lambda: _latest_run(stage, base_model, method, experiment, note_elsewhere))


def _latest_run(stage: str, base_model: str, method: str | None, experiment: str, note_elsewhere: bool) -> str | None:
    open_store()
    found = _newest_complete(_experiment_id(experiment), stage, base_model, method)
    if found is None and note_elsewhere:
        hint = elsewhere_hint(stage, base_model, method, experiment)
        if hint:
            note(f"note: {hint}")
    return found


def elsewhere_hint(stage: str, base_model: str, method: str | None, experiment: str) -> str:
    """'experiment X has no finished <stage> run ...; experiment realign has <id> (pass ...)', or "" when the
    `realign` experiment has none either (or is the experiment itself)."""
    name = experiment_name(experiment)
    if name == DEFAULT_EXPERIMENT:
        return ""
    elsewhere = _newest_complete(_experiment_id_by_name(DEFAULT_EXPERIMENT), stage, base_model, method)
    if elsewhere is None:
        return ""
    what = f"{stage}/{method}" if method else stage
    return (f"experiment {name!r} has no finished {what} run of {base_model}; experiment {DEFAULT_EXPERIMENT!r} "
            f"has {elsewhere} (pass {to_realign_experiment()}, or that run id, to use it)")


def to_realign_experiment() -> str:
    return "--experiment-name realign to mlflow run" if project_run_id() else "--experiment realign"


def _newest_complete(experiment_id: str | None, stage: str, base_model: str, method: str | None) -> str | None:
    if experiment_id is None:
        return None
    query = (f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_BASE_MODEL}` = '{base_model}' "
             f"and tags.`{TAG_COMPLETE}` = 'true' and attributes.status = 'FINISHED'")
    if method:
        query += f" and tags.`{TAG_METHOD}` = '{method}'"
    runs = client().search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def find_reusable_run(stage: str, params: dict[str, str], experiment: str) -> str | None:
    """The newest FINISHED, complete run of `stage` made by this code whose params include exactly `params`.

    RUNNING, FAILED, KILLED and incomplete runs never match: their artifacts may be half-written.
    """
    open_store()
    experiment_id = _experiment_id(experiment)
    if experiment_id is None:
        return None
    query = (f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_COMPLETE}` = 'true' "
             f"and tags.`{TAG_CODE_VERSION}` = '{code_version()}' and attributes.status = 'FINISHED'")
    for run in client().search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        logged = run.data.params
        if all(logged.get(key) == value for key, value in params.items()):
            return run.info.run_id
    return None


def _experiment_id(experiment: str) -> str | None:
    """The id of the experiment `experiment_name(experiment)` names; None if it does not exist yet."""
    project = project_run_id()
    if project:
        return client().get_run(project).info.experiment_id
    return _experiment_id_by_name(experiment_name(experiment))


def _experiment_id_by_name(name: str) -> str | None:
    experiment = client().get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None and experiment.lifecycle_stage == "active" else None


def experiment_of(run_id: str) -> str:
    """The name of the experiment that holds `run_id`."""
    return client().get_experiment(client().get_run(run_id).info.experiment_id).name
