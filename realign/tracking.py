"""The one module that talks to MLflow.

A stage is one MLflow run. `stage_run()` opens it (or resumes the run `mlflow run` created, via MLFLOW_RUN_ID),
marks it FAILED with the error as a tag when the stage raises, and FINISHED otherwise. Inputs are other runs,
named by run id or `runs:/<id>` URI; `resolve_input()` checks their stage, base model and status before
downloading their artifacts. Trainer metrics reach the stage run through `MetricsCallback` (never through
the HF MLflowCallback, which opens a run of its own when none is active in its process).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from realign import distributed
from realign.config import flatten, param_string, to_dict
from realign.errors import RealignError

TAG_STAGE = "realign.stage"
TAG_METHOD = "realign.method"
TAG_BASE_MODEL = "realign.base_model"
TAG_SOURCE = "realign.source."  # + role: aligned, sft, finetuned, reference, mask
TAG_ERROR = "realign.error"
TAG_JUDGE = "realign.judge"  # the judge behind harmful_score: part of the metric's meaning
TAG_TASK = "realign.task"  # the downstream task a run was fine-tuned (attacked) on
TAG_COMPLETE = "realign.complete"  # set last, after every artifact is logged
TAG_ADAPTER_BASE = "realign.adapter_base"  # run ids whose adapters must be merged into the base first
TAG_OUTPUT = "realign.output"  # which artifact holds the run's model: "adapter" (PEFT) or "model" (full weights)
TAG_SWEEP = "realign.sweep"  # on a parent run: the parameter its child runs sweep (expo: alpha)
TAG_CODE_VERSION = "realign.code_version"  # hash of the code and presets that made the run (pipeline reuse)
TAG_PIPELINE = "realign.pipeline"  # on a pipeline's parent run: the experiment file it ran
TAG_PROCESS = "realign.process"  # <host>:<pid> of the process that runs it: a dead one's RUNNING run is FAILED
TAG_RESUMED_FROM = "realign.resumed_from"  # <dead run id>/checkpoint-<step> a training stage resumed from
# Stages that may run as several processes (`accelerate launch`): they train; only the main process logs.
MULTI_PROCESS_STAGES = ("align", "attack")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "realign"

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _mlflow():
    import mlflow

    return mlflow


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def open_store() -> None:
    """Point MLflow at the configured store and prove it answers, before any work starts."""
    mlflow = _mlflow()
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        folder = db_path.parent
        if not folder.is_dir():
            raise RealignError(f"tracking store {uri} is not writable: folder {folder} does not exist",
                               "create the folder, or set MLFLOW_TRACKING_URI to a writable sqlite:/// path "
                               "or a tracking server http://host:5000")
        if not os.access(folder, os.W_OK) or (db_path.exists() and not os.access(db_path, os.W_OK)):
            raise RealignError(f"tracking store {uri} is not writable",
                               "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a tracking server "
                               "http://host:5000")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # any store failure: unreachable server, broken db, permissions
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RealignError(f"cannot open tracking store {uri}: {first_line[:200]}",
                           "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a running mlflow server") from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


@dataclass
class InputRun:
    """Another stage's run, checked and with its artifacts downloaded."""

    role: str
    run_id: str
    stage: str
    method: str
    base_model: str
    tags: dict[str, str]
    params: dict[str, str]
    local_dir: Path | None  # where the requested artifact folder was downloaded

    @property
    def adapter_base(self) -> list[str]:
        """Run ids whose adapters were merged into the base model before this run's adapter was trained."""
        value = self.tags.get(TAG_ADAPTER_BASE, "")
        return [v for v in value.split(",") if v]


def parse_run_ref(ref: str, role: str) -> str:
    """A bare run id or a `runs:/<id>[/path]` URI -> the run id."""
    text = ref.strip()
    if text.startswith("runs:/"):
        text = text[len("runs:/"):].split("/", 1)[0]
    if not _RUN_ID.match(text):
        raise RealignError(f"{role} run {ref!r} is not a run id", "pass a 32-hex run id or runs:/<run_id>")
    return text


class StageRun:
    """The open run of one stage; every write to MLflow goes through here."""

    is_main = True  # False for the other processes of an `accelerate launch` (ReplicaRun)

    def __init__(self, run_id: str, stage: str):
        self.run_id = run_id
        self.stage = stage
        self.workdir = Path(tempfile.mkdtemp(prefix=f"realign-{stage}-"))

    # -- tags, params, metrics ---------------------------------------------------------------------------------
    def set_tags(self, tags: dict[str, Any]) -> None:
        _mlflow().set_tags({k: str(v) for k, v in tags.items()})

    def set_name(self, name: str) -> None:
        _mlflow().set_tag("mlflow.runName", name)

    def log_config(self, cfg: Any) -> None:
        """The resolved config: flattened params (UI compare view) and config.yaml (the exact record)."""
        mlflow = _mlflow()
        data = to_dict(cfg)
        existing = mlflow.MlflowClient().get_run(self.run_id).data.params
        # `mlflow run -P key=value` already logged the user's own spelling of some keys; params are
        # immutable, so those keep it and config.yaml holds the resolved value.
        params = {k: param_string(v) for k, v in flatten(data).items() if k not in existing}
        for start in range(0, len(params), 100):
            chunk = dict(list(params.items())[start:start + 100])
            mlflow.log_params(chunk)
        mlflow.log_text(yaml.safe_dump(data, sort_keys=False), "config.yaml")

    def log_params(self, params: dict[str, Any]) -> None:
        _mlflow().log_params({k: param_string(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dataset(self, dataset: Any, name: str, context: str, hub_path: str | None = None) -> None:
        """A `datasets.Dataset` as a run input (name, digest, schema, profile)."""
        mlflow = _mlflow()
        ds = mlflow.data.from_huggingface(dataset, path=hub_path, name=name)
        for attempt in range(5):
            try:
                mlflow.log_input(ds, context=context)
                return
            except Exception as err:
                # Two runs logging the same dataset at once into one store race on its insert (UNIQUE
                # constraint on experiment, name, digest); the row exists now, so the next try links to it.
                if "UNIQUE constraint" not in str(err) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # -- artifacts ---------------------------------------------------------------------------------------------
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None:
        _mlflow().log_artifacts(str(local_dir), artifact_path)

    def log_adapter(self, adapter_dir: str | Path) -> None:
        """A standard PEFT directory (adapter_config.json + adapter_model.safetensors) under adapter/."""
        adapter_dir = Path(adapter_dir)
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter_dir / f).is_file()]
        if missing:
            raise RuntimeError(f"adapter dir {adapter_dir} lacks {', '.join(missing)}")
        self.log_dir(adapter_dir, "adapter")

    def log_table(self, data: dict[str, list] | Any, artifact_file: str) -> None:
        _mlflow().log_table(data, artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A plotly figure as a self-contained HTML file (plotly.js embedded: it opens offline in the UI)."""
        path = self.workdir / "figures" / Path(artifact_file).name
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.write_html(str(path), include_plotlyjs=True, full_html=True)
        parent = str(Path(artifact_file).parent)
        _mlflow().log_artifact(str(path), None if parent == "." else parent)

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        _mlflow().log_artifact(str(local_path), artifact_dir)

    def mark_complete(self) -> None:
        _mlflow().set_tag(TAG_COMPLETE, "true")

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
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def log_adapter(self, adapter_dir: str | Path) -> None: ...
    def log_table(self, data: Any, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None: ...
    def mark_complete(self) -> None: ...


def resolve_run(ref: str, role: str, stages: tuple[str, ...], base_model: str,
                methods: tuple[str, ...] | None = None) -> InputRun:
    mlflow = _mlflow()
    run_id = parse_run_ref(ref, role)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception:
        raise RealignError(f"{role} run {run_id} does not exist in {tracking_uri()}",
                           "pass the id of a FINISHED run from this tracking store (see `mlflow ui`)") from None
    tags = run.data.tags
    stage = tags.get(TAG_STAGE, "")
    method = tags.get(TAG_METHOD, "")
    if stage not in stages:
        raise RealignError(f"{role} run {run_id} is a {stage or 'non-realign'} run, not {' or '.join(stages)}",
                           f"pass the id of a {'/'.join(stages)} run")
    if methods is not None and method not in methods:
        raise RealignError(f"{role} run {run_id} is {stage}/{method}, not {stage}/{'|'.join(methods)}",
                           f"pass the id of a {stage}/{'|'.join(methods)} run")
    if run.info.status != "FINISHED" or tags.get(TAG_COMPLETE) != "true":
        raise RealignError(f"{role} run {run_id} is {run.info.status}, not FINISHED",
                           "pass a run that finished; rerun the stage that produced it")
    run_base = tags.get(TAG_BASE_MODEL, "")
    if run_base != base_model:
        raise RealignError(f"{role} run {run_id} belongs to base model {run_base!r}, not {base_model!r}",
                           f"pass a run of {base_model!r} or set --model {run_base}")
    return InputRun(role=role, run_id=run_id, stage=stage, method=method, base_model=run_base,
                    tags=dict(tags), params=dict(run.data.params), local_dir=None)


def download_artifact(run_id: str, artifact: str, dst: Path, role: str) -> Path:
    mlflow = _mlflow()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst))
    except Exception:
        raise RealignError(f"{role} run {run_id} has no {artifact}/ artifact",
                           "pass a run that logged one (its stage must have finished)") from None
    check_artifact_files(Path(path), f"{role} run {run_id}")
    return Path(path)


def check_artifact_files(folder: Path, owner: str) -> None:
    """Every safetensors and JSON file under `folder` parses: a corrupt artifact fails here, in one line."""
    import json

    from safetensors import safe_open

    files = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:  # header and sizes checked, no weights read
                    list(handle.keys())
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:
            raise RealignError(f"{owner}: artifact {path.relative_to(folder.parent)} is corrupt "
                               f"({_one_line(err)[:120]})",
                               "rerun the stage that produced it and pass the new run id") from None


def search_runs(experiment: str = DEFAULT_EXPERIMENT, filter_string: str = ""):
    """The runs of `experiment` that match `filter_string`, newest first, as MLflow's pandas DataFrame.

    One row per run; columns run_id, status, start_time, tags.*, params.*, metrics.* (latest values). Under
    `mlflow run` the experiment is the one it chose. An experiment that does not exist gives an empty frame.
    """
    import pandas as pd

    mlflow = _mlflow()
    open_store()
    experiment_id = _experiment_id(experiment)
    if experiment_id is None:
        return pd.DataFrame()
    try:
        return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time DESC"], output_format="pandas")
    except Exception as err:  # a malformed filter is the user's typo, not a crash
        raise RealignError(f"cannot search runs with filter {filter_string!r}: {_one_line(err)[:200]}",
                           "write an MLflow filter such as tags.`realign.base_model` = 'smollm2-135m'") from None


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of run `run_id` (e.g. an input run's evaluation, shown next to a result)."""
    return dict(_mlflow().MlflowClient().get_run(run_id).data.metrics)


def latest_run(stage: str, base_model: str, method: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The newest FINISHED and complete run of `stage` (and `method`) for `base_model`, or None.

    Under `accelerate launch` the main process looks and every process gets its answer.
    """
    return distributed.agree(lambda: _latest_run(stage, base_model, method, experiment))


def _latest_run(stage: str, base_model: str, method: str | None, experiment: str) -> str | None:
    mlflow = _mlflow()
    experiment_id = _experiment_id(experiment)
    if experiment_id is None:
        return None
    query = (f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_BASE_MODEL}` = '{base_model}' "
             f"and tags.`{TAG_COMPLETE}` = 'true' and attributes.status = 'FINISHED'")
    if method:
        query += f" and tags.`{TAG_METHOD}` = '{method}'"
    runs = mlflow.MlflowClient().search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                             max_results=1)
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def stage_run(stage: str, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
              new_run: bool = False) -> Iterator[StageRun]:
    """Open (or, under `mlflow run`, resume) the stage's run; FAILED with the error tagged if the body raises.

    `new_run=True` opens a run of its own even under `mlflow run`: an input that a stage trains first (the SFT
    run a DPO run starts from) is a run of its own, reused later, not the run `mlflow run` made for the caller.
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
    with _ended_when_done(StageRun(run_id, stage), run_name) as stage_ctx:
        yield stage_ctx


def _start_stage_run(stage: str, experiment: str, run_name: str | None, new_run: bool) -> str:
    mlflow = _mlflow()
    open_store()
    resumed = os.environ.get("MLFLOW_RUN_ID")
    if mlflow.active_run() is not None:
        raise RuntimeError("a stage run is already active in this process")
    if resumed and not new_run:
        run = mlflow.start_run(run_id=resumed)
    else:
        if resumed:  # `mlflow run` chose the experiment; the new run goes next to the one it created
            experiment_id = mlflow.MlflowClient().get_run(resumed).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
        else:
            mlflow.set_experiment(experiment)
        with _env_without("MLFLOW_RUN_ID"):
            run = mlflow.start_run(run_name=run_name or stage)
    mark_dead_runs(run.info.experiment_id)
    return run.info.run_id


@contextlib.contextmanager
def _ended_when_done(ctx: StageRun, run_name: str | None) -> Iterator[StageRun]:
    """Tag and name the active run, then end it: FINISHED, or FAILED (KILLED on Ctrl-C) with the error tagged."""
    mlflow = _mlflow()
    try:
        ctx.set_tags({TAG_STAGE: ctx.stage, TAG_CODE_VERSION: code_version(), TAG_PROCESS: this_process()})
        if run_name:
            ctx.set_name(run_name)
        yield ctx
    except BaseException as err:
        with contextlib.suppress(Exception):
            mlflow.set_tag(TAG_ERROR, _one_line(err) if not isinstance(err, KeyboardInterrupt) else "interrupted")
        mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


@contextlib.contextmanager
def child_run(parent: StageRun, run_name: str) -> Iterator[StageRun]:
    """A run nested under `parent` (one point of a sweep); FAILED with the error tagged if the body raises.

    The parent stays open; its own `stage_run` context ends it, FAILED too when a child's error propagates.
    """
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is None or active.info.run_id != parent.run_id:
        raise RuntimeError("child_run needs its parent to be the active run")
    with _env_without("MLFLOW_RUN_ID"):  # never resume the parent: a child is a run of its own
        run = mlflow.start_run(run_name=run_name, nested=True)
    with _ended_when_done(StageRun(run.info.run_id, parent.stage), run_name) as child:
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
    client = _mlflow().MlflowClient()
    query = f"attributes.status = 'RUNNING' and tags.`{TAG_PROCESS}` != ''"
    dead = []
    with contextlib.suppress(Exception):  # housekeeping: never the reason a stage fails
        for run in client.search_runs([experiment_id], query, max_results=200):
            process = run.data.tags.get(TAG_PROCESS, "")
            if process and not process_is_alive(process):
                mark_abandoned(run.info.run_id, f"its process {process} died before the run ended")
                dead.append(run.info.run_id)
    return dead


def mark_abandoned(run_id: str, note: str, overwrite: bool = False) -> None:
    """FAILED, with `note` as its error, for a run still RUNNING whose process is known to be dead.

    `overwrite=True` also replaces the note on a run already marked FAILED (a resumed run names its successor).
    """
    client = _mlflow().MlflowClient()
    with contextlib.suppress(Exception):  # gone or already ended: nothing to mark
        status = client.get_run(run_id).info.status
        if status == "RUNNING" or (overwrite and status == "FAILED"):
            client.set_tag(run_id, TAG_ERROR, note)
        if status == "RUNNING":
            client.set_terminated(run_id, "FAILED")


def copy_evaluation(run_id: str, metrics: dict[str, float], judge: str) -> None:
    """Put an evaluate run's numbers on the run it evaluated, for the UI's compare view (status unchanged)."""
    import time

    from mlflow.entities import RunTag

    now = int(time.time() * 1000)
    client = _mlflow().MlflowClient()
    client.log_batch(run_id, metrics=[_metric(k, v, 0, now) for k, v in metrics.items()],
                     tags=[RunTag(TAG_JUDGE, judge)])


_CODE_VERSION: str | None = None


def code_version() -> str:
    """A hash of realign's own source and presets (realign/**/*.py, conf/**/*.yaml): equal hashes, same code.

    Not the git commit: an installed package has none, and a checkout with local edits would share one.
    """
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import hashlib

        import realign
        from realign.config import conf_dir

        digest = hashlib.sha256()
        package = Path(realign.__file__).parent
        files = [(f"realign/{p.relative_to(package)}", p) for p in package.rglob("*.py")]
        files += [(f"conf/{p.relative_to(conf_dir())}", p) for p in conf_dir().rglob("*.yaml")]
        for name, path in sorted(files):
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_VERSION = digest.hexdigest()[:16]
    return _CODE_VERSION


def find_reusable_run(stage: str, params: dict[str, str], experiment: str) -> str | None:
    """The newest FINISHED, complete run of `stage` made by this code whose params include exactly `params`.

    RUNNING, FAILED, KILLED and incomplete runs never match: their artifacts may be half-written.
    """
    mlflow = _mlflow()
    experiment_id = _experiment_id(experiment)
    if experiment_id is None:
        return None
    query = (f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_COMPLETE}` = 'true' "
             f"and tags.`{TAG_CODE_VERSION}` = '{code_version()}' and attributes.status = 'FINISHED'")
    for run in mlflow.MlflowClient().search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        logged = run.data.params
        if all(logged.get(key) == value for key, value in params.items()):
            return run.info.run_id
    return None


def _experiment_id(experiment: str) -> str | None:
    """The id of the experiment runs are searched in; None if it does not exist yet.

    Under `mlflow run`, the run it created (MLFLOW_RUN_ID) names the experiment it chose (--experiment-name).
    Not MLFLOW_EXPERIMENT_ID: every mlflow.set_experiment() in this process (each stage run's) overwrites it.
    """
    mlflow = _mlflow()
    resumed = os.environ.get("MLFLOW_RUN_ID")
    if resumed:
        return mlflow.MlflowClient().get_run(resumed).info.experiment_id
    exp = mlflow.get_experiment_by_name(experiment)
    return exp.experiment_id if exp is not None else None


@contextlib.contextmanager
def parent_run(name: str, experiment: str, tags: dict[str, str]) -> Iterator[str]:
    """A run that groups stage runs (a pipeline): not the active run, so each stage opens its own.

    Under `mlflow run` the run it created (MLFLOW_RUN_ID) is the parent. FINISHED when the body returns,
    FAILED (KILLED on Ctrl-C) with the error tagged when it raises.
    """
    mlflow = _mlflow()
    open_store()
    client = mlflow.MlflowClient()
    resumed = os.environ.get("MLFLOW_RUN_ID")
    if resumed:
        run_id = resumed
        client.set_tag(run_id, "mlflow.runName", name)
    else:
        experiment_id = _experiment_id(experiment) or client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name=name).info.run_id
    for key, value in {TAG_CODE_VERSION: code_version(), TAG_PROCESS: this_process(), **tags}.items():
        client.set_tag(run_id, key, str(value))
    mark_dead_runs(client.get_run(run_id).info.experiment_id)
    try:
        with _env_without("MLFLOW_RUN_ID"):  # stages open runs of their own
            yield run_id
    except BaseException as err:
        with contextlib.suppress(Exception):
            client.set_tag(run_id, TAG_ERROR, _one_line(err) if not isinstance(err, KeyboardInterrupt) else "interrupted")
        client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    else:
        client.set_tag(run_id, TAG_COMPLETE, "true")
        client.set_terminated(run_id, "FINISHED")


def experiment_of(run_id: str) -> str:
    """The name of the experiment that holds `run_id`."""
    client = _mlflow().MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def nest_under(run_id: str, parent_id: str) -> None:
    """Show `run_id` under `parent_id` in the UI (MLflow's own nesting tag)."""
    _mlflow().MlflowClient().set_tag(run_id, "mlflow.parentRunId", parent_id)


def log_parent_table(parent_id: str, data: dict[str, list], artifact_file: str) -> None:
    """A table artifact on a run that is not the active one (the pipeline's parent)."""
    _mlflow().MlflowClient().log_table(parent_id, data=data, artifact_file=artifact_file)


@contextlib.contextmanager
def _env_without(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


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
                _mlflow().MlflowClient().log_batch(
                    run_id, metrics=[_metric(k, v, state.global_step, now) for k, v in numbers.items()])

    return MetricsCallback()


def _metric(key: str, value: float, step: int, timestamp_ms: int):
    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=timestamp_ms, step=step)
