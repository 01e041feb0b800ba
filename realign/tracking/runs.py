"""A stage's run from open to end: `stage_run` (or the run `mlflow run` opened), child and parent runs, every
write through the client with the run's id, dead runs marked FAILED, the Trainer's metrics logged into it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from realign import distributed
from realign.config import flatten, param_string, to_dict
from realign.errors import RealignError
from realign.tracking.experiments import (describe_experiment, experiment_name, experiment_of, get_or_create_experiment,
                                         project_run_id)
from realign.tracking.inputs import InputRun, download_artifact, resolve_run
from realign.tracking.store import StoreError, _mlflow, _one_line, client, code_version, is_store_failure, open_store
from realign.tracking.tags import MULTI_PROCESS_STAGES, TAG_CODE_VERSION, TAG_COMPLETE, TAG_ERROR, TAG_OUTPUT, TAG_PROCESS, TAG_SOURCE, TAG_STAGE



# -- where runs go -----------------------------------------------------------------------------------------------
_CLAIMED: set[str] = set()  # project runs (MLFLOW_RUN_ID) a stage or pipeline of this process has taken


_NEST_UNDER: list[str] = []  # open parent runs (a pipeline's) that new stage runs are nested under, innermost last
_NEW_RUN_TAGS: list[dict[str, str]] = []  # tags every stage run opened inside `tagging_new_runs` starts with


class StageRun:
    """The open run of one stage; every write to MLflow goes through here."""

    is_main = True  # False for the other processes of an `accelerate launch` (ReplicaRun)

    def __init__(self, run_id: str, stage: str):
        self.run_id = run_id
        self.stage = stage
        self.workdir = Path(tempfile.mkdtemp(prefix=f"realign-{stage}-"))

    # -- tags, params, metrics ---------------------------------------------------------------------------------
    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_name(self, name: str) -> None:
        client().set_tag(self.run_id, "mlflow.runName", name)

    def log_config(self, cfg: Any) -> None:
        """The resolved config: flattened params (UI compare view) and config.yaml (the exact record).

        An `experiment` key records the experiment the run is really in.
        """
        data = to_dict(cfg)
        if "experiment" in data:
            data["experiment"] = experiment_of(self.run_id)
        existing = client().get_run(self.run_id).data.params
        # `mlflow run -P key=value` already logged the user's own spelling of some keys; params are
        # immutable, so those keep it and config.yaml holds the resolved value.
        self.log_params({k: v for k, v in flatten(data).items() if k not in existing})
        client().log_text(self.run_id, yaml.safe_dump(data, sort_keys=False), "config.yaml")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_string(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            client().log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [_metric(k, v, step or 0, now) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            client().log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_dataset(self, dataset: Any, name: str, context: str, hub_path: str | None = None) -> None:
        """A `datasets.Dataset` as a run input (name, digest, schema, profile)."""
        mlflow = _mlflow()
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        ds = mlflow.data.from_huggingface(dataset, path=hub_path, name=name)
        # Two runs logging the same dataset at once race on its insert (UNIQUE constraint on experiment, name,
        # digest); store_call retries it, and the row then exists, so the retry links to it.
        client().log_inputs(self.run_id, datasets=[
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_prompt_set(self, prompts: list[str], name: str, path: str = "", origin: str = "",
                       context: str = "evaluation") -> None:
        """Prompts a stage read, as a run input (the runs table's Datasets column): from the file at `path`, or
        made by realign's code (`origin` names the function)."""
        import pandas as pd
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source = str(Path(path).resolve()) if path else CodeDatasetSource(tags={"realign.origin": origin or name})
        ds = _mlflow().data.from_pandas(pd.DataFrame({"prompt": prompts}), source=source, name=name[:500])
        client().log_inputs(self.run_id, datasets=[
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    # -- artifacts ---------------------------------------------------------------------------------------------
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None:
        client().log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_adapter(self, adapter_dir: str | Path) -> None:
        """A standard PEFT directory (adapter_config.json + adapter_model.safetensors) under adapter/."""
        adapter_dir = Path(adapter_dir)
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter_dir / f).is_file()]
        if missing:
            raise RuntimeError(f"adapter dir {adapter_dir} lacks {', '.join(missing)}")
        self.log_dir(adapter_dir, "adapter")

    def log_table(self, data: dict[str, list] | Any, artifact_file: str) -> None:
        client().log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A plotly figure as a self-contained HTML file (plotly.js embedded: it opens offline in the UI)."""
        path = self.workdir / "figures" / Path(artifact_file).name
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.write_html(str(path), include_plotlyjs=True, full_html=True)
        parent = str(Path(artifact_file).parent)
        self.log_file(path, None if parent == "." else parent)

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        client().log_artifact(self.run_id, str(local_path), artifact_dir)

    def mark_complete(self) -> None:
        client().set_tag(self.run_id, TAG_COMPLETE, "true")

    # -- inputs ------------------------------------------------------------------------------------------------
    def resolve_input(self, ref: str, role: str, stages: tuple[str, ...], base_model: str,
                      methods: tuple[str, ...] | None = None, artifact: str | None = "adapter") -> InputRun:
        """Check run `ref` (stage, base model, FINISHED) and download its `artifact` folder into the workdir."""
        run = resolve_run(ref, role, stages, base_model, methods)
        local_dir = None
        if artifact:
            local_dir = download_artifact(run.run_id, artifact, self.workdir / f"input-{role}", role)
        run.local_dir = local_dir
        self.set_tags({f"{TAG_SOURCE}{role}": run.run_id})
        return run

    def model_of(self, source: InputRun, model_cfg: Any) -> tuple[Any, list[str]]:
        """(model config, adapter dirs) that rebuild `source`'s weights with `models.load_model`.

        A run that logged full weights (`realign.output` = model: merged EXPO, fused models) is a local model dir;
        any other run is the base plus its adapter chain. `source` may be resolved with `artifact=None`.
        """
        import dataclasses

        if source.tags.get(TAG_OUTPUT) == "model":
            model_dir = download_artifact(source.run_id, "model", self.workdir / f"model-{source.run_id}", source.role)
            return dataclasses.replace(model_cfg, source="local", path=str(model_dir)), []
        if source.local_dir is None:
            source.local_dir = download_artifact(source.run_id, "adapter", self.workdir / f"input-{source.role}",
                                                 source.role)
        return model_cfg, self.adapter_chain(source)

    def adapter_chain(self, source: InputRun) -> list[str]:
        """Local adapter dirs that rebuild `source`'s weights: the adapters merged under it, then its own."""
        chain = [str(download_artifact(run_id, "adapter", self.workdir / f"chain-{run_id}", "adapter base"))
                 for run_id in source.adapter_base]
        return chain + [str(source.local_dir)]


class ReplicaRun(StageRun):
    """The main process's run as another process of an `accelerate launch` sees it: it reads, never writes."""

    is_main = False

    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def set_name(self, name: str) -> None: ...
    def log_config(self, cfg: Any) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_dataset(self, dataset: Any, name: str, context: str, hub_path: str | None = None) -> None: ...
    def log_prompt_set(self, prompts: list[str], name: str, path: str = "", origin: str = "",
                       context: str = "evaluation") -> None: ...
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def log_adapter(self, adapter_dir: str | Path) -> None: ...
    def log_table(self, data: Any, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None: ...
    def mark_complete(self) -> None: ...


@contextlib.contextmanager
def stage_run(stage: str, experiment: str = "", run_name: str | None = None,
              new_run: bool = False) -> Iterator[StageRun]:
    """Open (or, under `mlflow run`, take) the stage's run; FAILED with the error tagged if the body raises.

    `new_run=True` opens a run of its own even under `mlflow run`: an input that a stage trains first (the SFT
    run a DPO run starts from) is a run of its own, reused later, nested under the run `mlflow run` made.
    """
    if distributed.world_size() > 1:
        if stage not in MULTI_PROCESS_STAGES:
            raise RealignError(f"the {stage} stage runs as one process, not {distributed.world_size()}",
                               f"run it without accelerate launch; only {', '.join(MULTI_PROCESS_STAGES)} train")
        if not distributed.is_main_process():
            replica = ReplicaRun(distributed.agree(lambda: None), stage)
            try:
                yield replica
            finally:
                shutil.rmtree(replica.workdir, ignore_errors=True)
            return
    run_id = distributed.agree(lambda: _start_stage_run(stage, experiment, run_name, new_run))
    with _ended_when_done(StageRun(run_id, stage)) as stage_ctx:
        yield stage_ctx


def _start_stage_run(stage: str, experiment: str, run_name: str | None, new_run: bool) -> str:
    open_store()
    project = project_run_id()
    base_tags = {TAG_STAGE: stage, TAG_CODE_VERSION: code_version(), TAG_PROCESS: this_process()}
    if project and not new_run and project not in _CLAIMED:
        experiment_id = claim_project_run(project, experiment)
        StageRun(project, stage).set_tags({**base_tags, **({"mlflow.runName": run_name} if run_name else {})})
        run_id = project
    else:
        parent = _NEST_UNDER[-1] if _NEST_UNDER else project
        experiment_id = get_or_create_experiment(experiment_name(experiment))
        if parent:
            base_tags["mlflow.parentRunId"] = parent
        for tags in _NEW_RUN_TAGS:
            base_tags.update(tags)
        run_id = create_run(experiment_id, run_name or stage, base_tags)
    mark_dead_runs(experiment_id)
    return run_id


@contextlib.contextmanager
def tagging_new_runs(tags: dict[str, str]) -> Iterator[None]:
    """Every stage run opened inside starts with `tags` (a search's study and trial number), so a run that fails
    is found by them too."""
    _NEW_RUN_TAGS.append(dict(tags))
    try:
        yield
    finally:
        _NEW_RUN_TAGS.pop()


def claim_project_run(project: str, experiment: str) -> str:
    """Take the run `mlflow run` opened as this process's own; its experiment id.

    An explicit `experiment` that is not mlflow run's fails that run, in one line.
    """
    _CLAIMED.add(project)
    run = client().get_run(project)
    if run.info.status != "RUNNING":
        raise RealignError(f"the run mlflow run opened ({project}) is {run.info.status}, not RUNNING",
                           "start the stage again with mlflow run, or without MLFLOW_RUN_ID")
    describe_experiment(client().get_experiment(run.info.experiment_id))
    try:
        experiment_name(experiment)
    except RealignError as err:
        end_run(project, err)
        raise
    return run.info.experiment_id


def fail_project_run(err: BaseException) -> None:
    """FAILED with `err` for the run `mlflow run` opened, when it is still RUNNING (the error came before any
    stage took it, e.g. a bad option). Never raises: the store may be what failed."""
    project = project_run_id()
    with contextlib.suppress(Exception):
        if project and _mlflow().MlflowClient().get_run(project).info.status == "RUNNING":
            _CLAIMED.add(project)
            end_run(project, err)


def create_run(experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A new RUNNING run; its tags (the process among them) are set in the same call, so no other process can
    see it RUNNING without knowing whose it is."""
    return client().create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}).info.run_id


@contextlib.contextmanager
def _ended_when_done(ctx: StageRun) -> Iterator[StageRun]:
    """End the run when the body does: FINISHED, or FAILED (KILLED on Ctrl-C) with the error tagged."""
    try:
        yield ctx
    except BaseException as err:
        end_run(ctx.run_id, err)
        raise
    else:
        end_run(ctx.run_id)
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def end_run(run_id: str, err: BaseException | None = None) -> None:
    """FINISHED, or FAILED (KILLED for Ctrl-C) with the error's one line as `realign.error`.

    Ending a run after a failure never raises in turn: the store may be the thing that failed.
    """
    if err is None:
        from realign.tracking import ui

        client().set_tag(run_id, ui.NOTE_TAG, ui.run_summary(client().get_run(run_id)))
        client().set_terminated(run_id, "FINISHED")
        return
    # After a store failure one plain try each: retrying a store that just failed would only delay the error.
    store = _mlflow().MlflowClient() if isinstance(err, StoreError) or is_store_failure(err) else client()
    with contextlib.suppress(Exception):
        store.set_tag(run_id, TAG_ERROR, "interrupted" if isinstance(err, KeyboardInterrupt) else _one_line(err))
    with contextlib.suppress(Exception):
        store.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")


@contextlib.contextmanager
def child_run(parent: StageRun, run_name: str) -> Iterator[StageRun]:
    """A run nested under `parent` (one point of a sweep); FAILED with the error tagged if the body raises.

    The parent stays open; its own `stage_run` context ends it, FAILED too when a child's error propagates.
    """
    experiment_id = client().get_run(parent.run_id).info.experiment_id
    run_id = create_run(experiment_id, run_name, {TAG_STAGE: parent.stage, TAG_CODE_VERSION: code_version(),
                                                  TAG_PROCESS: this_process(), "mlflow.parentRunId": parent.run_id})
    with _ended_when_done(StageRun(run_id, parent.stage)) as child:
        yield child


def this_process() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_alive(process: str) -> bool:
    """Whether `<host>:<pid>` still runs; a process of another machine counts as alive (we cannot tell)."""
    import socket

    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs(experiment_id: str) -> list[str]:
    """FAILED, with the reason tagged, for every RUNNING run of this machine whose process is gone (SIGKILL, OOM).

    Such runs were never reused or taken as inputs (they are not complete); this only stops the UI calling them
    running. Returns their ids.
    """
    query = f"attributes.status = 'RUNNING' and tags.`{TAG_PROCESS}` != ''"
    dead = []
    # Housekeeping, never the reason a stage fails. Two processes may mark the same dead run: both write the
    # same tag and status.
    with contextlib.suppress(Exception):
        for run in client().search_runs([experiment_id], query, max_results=200):
            process = run.data.tags.get(TAG_PROCESS, "")
            if process and not process_is_alive(process):
                mark_abandoned(run.info.run_id, f"its process {process} died before the run ended")
                dead.append(run.info.run_id)
    return dead


def mark_abandoned(run_id: str, reason: str, overwrite: bool = False) -> None:
    """FAILED, with `reason` as its error, for a run still RUNNING whose process is known to be dead.

    `overwrite=True` also replaces the reason on a run already marked FAILED (a resumed run names its successor).
    """
    with contextlib.suppress(Exception):  # gone or already ended: nothing to mark
        status = client().get_run(run_id).info.status
        if status == "RUNNING" or (overwrite and status == "FAILED"):
            client().set_tag(run_id, TAG_ERROR, reason)
        if status == "RUNNING":
            client().set_terminated(run_id, "FAILED")


def copy_evaluation(run_id: str, metrics: dict[str, float], identity: dict[str, str]) -> None:
    """Put an evaluate run's numbers and what they were measured with (judge, prompts, decoding) on the run it
    evaluated, for the UI's compare view (status unchanged)."""
    from mlflow.entities import RunTag

    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[_metric(k, v, 0, now) for k, v in metrics.items()],
                       tags=[RunTag(k, str(v)) for k, v in identity.items()])


@contextlib.contextmanager
def parent_run(name: str, experiment: str, tags: dict[str, str]) -> Iterator[str]:
    """A run that groups stage runs (a pipeline, a search); every stage run opened inside is nested under it, and
    it is nested under the group that is open around it (a search step of a pipeline).

    Under `mlflow run` the run it opened (MLFLOW_RUN_ID) is the parent. FINISHED when the body returns,
    FAILED (KILLED on Ctrl-C) with the error tagged when it raises.
    """
    open_store()
    project = project_run_id()
    own_tags = {TAG_CODE_VERSION: code_version(), TAG_PROCESS: this_process(), **tags}
    if project and project not in _CLAIMED:
        claim_project_run(project, experiment)
        run_id = project
        StageRun(run_id, "pipeline").set_tags({"mlflow.runName": name, **own_tags})
    else:
        outer = _NEST_UNDER[-1] if _NEST_UNDER else project  # a search step of a pipeline nests under it
        if outer:
            own_tags["mlflow.parentRunId"] = outer
        run_id = create_run(get_or_create_experiment(experiment_name(experiment)), name, own_tags)
    mark_dead_runs(client().get_run(run_id).info.experiment_id)
    _NEST_UNDER.append(run_id)
    try:
        yield run_id
    except BaseException as err:
        end_run(run_id, err)
        raise
    else:
        client().set_tag(run_id, TAG_COMPLETE, "true")
        end_run(run_id)
    finally:
        _NEST_UNDER.remove(run_id)


@contextlib.contextmanager
def nested_under(parent_id: str) -> Iterator[None]:
    """Stage runs opened inside are nested under `parent_id`, a group run another process holds open (a pipeline
    cell run by a Ray worker, under the driver's `pipeline/<name>`)."""
    _NEST_UNDER.append(parent_id)
    try:
        yield
    finally:
        _NEST_UNDER.remove(parent_id)


def log_parent_table(parent_id: str, data: dict[str, list], artifact_file: str) -> None:
    """A table artifact on a run that is not the stage's own (the pipeline's parent)."""
    client().log_table(parent_id, data=data, artifact_file=artifact_file)


def metrics_callback(run_id: str):
    """A TrainerCallback that logs the Trainer's numbers into run `run_id` from the main process only."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            # Same keys the HF MLflowCallback would use (loss, grad_norm, rewards/chosen, ...).
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                now = int(time.time() * 1000)
                client().log_batch(
                    run_id, metrics=[_metric(k, v, state.global_step, now) for k, v in numbers.items()])

    return MetricsCallback()


def _metric(key: str, value: float, step: int, timestamp_ms: int):
    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=timestamp_ms, step=step)
