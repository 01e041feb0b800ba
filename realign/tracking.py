"""The one module that talks to MLflow.

A stage is one MLflow run. `stage_run()` opens it (or, under `mlflow run`, takes the run MLflow opened for the
process: MLFLOW_RUN_ID), marks it FAILED with the error as a tag when the stage raises, and FINISHED otherwise.
Every write names its run id through the client (never MLflow's fluent "active run", whose start and end edit
MLFLOW_RUN_ID behind our back), and every store call goes through `store_call`, which retries what is transient
(a locked SQLite file, a 5xx, a dropped connection) for a few seconds and then fails in one line.

Where runs go (`experiment_name`): under `mlflow run`, the experiment of the run it opened, and every run made on
the way (an input trained because none existed) is nested under that run; otherwise `--experiment`, else
$MLFLOW_EXPERIMENT_NAME, else `realign`. Experiments are got-or-created race-free, and a fresh SQLite store is
created and migrated by one process at a time (a lock file beside it).

Inputs are other runs, named by run id or `runs:/<id>` URI; `resolve_input()` checks their stage, base model and
status before downloading their artifacts. Trainer metrics reach the stage run through `metrics_callback` (never
through the HF MLflowCallback, which opens a run of its own when none is active in its process).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import shutil
import sys
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
# What else makes two harmful scores comparable: the judge's content, its threshold, the prompt set and decoding.
TAG_JUDGE_HASH = "realign.judge_hash"
TAG_JUDGE_THRESHOLD = "realign.judge_threshold"
TAG_PROMPTS = "realign.prompts"  # builtin:test, hub:<id> or file:<path>
TAG_PROMPTS_DIGEST = "realign.prompts_digest"  # realign.data.prompts.prompt_set_digest of the harmful prompts
TAG_DECODING = "realign.decoding"  # greedy,max_new_tokens=<n>
SCORE_IDENTITY_TAGS = (TAG_JUDGE, TAG_JUDGE_HASH, TAG_JUDGE_THRESHOLD, TAG_PROMPTS, TAG_PROMPTS_DIGEST, TAG_DECODING)
TAG_TASK = "realign.task"  # the downstream task a run was fine-tuned (attacked) on
TAG_COMPLETE = "realign.complete"  # set last, after every artifact is logged
TAG_ADAPTER_BASE = "realign.adapter_base"  # run ids whose adapters must be merged into the base first
TAG_ADAPTER_INIT = "realign.adapter_init"  # the run whose adapter this run's adapter continued training
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


# -- transient store errors ------------------------------------------------------------------------------------
# Substrings of errors that a retry can cure: SQLite busy with another writer, a server restarting or overloaded,
# a connection dropped, and the UNIQUE race of two idempotent writes (the same tag or dataset row) at once.
TRANSIENT_ERRORS = ("database is locked", "database table is locked", "unique constraint failed",
                    "connection refused", "connection reset", "connection aborted", "remotedisconnected",
                    "max retries exceeded", "temporarily unavailable", "too many 5", "read timed out",
                    "502", "503", "504", "bad gateway", "service unavailable", "gateway time")
RETRY_BUDGET_S = 8.0  # retries stop once this much time has passed (SQLite itself waits 5 s per locked attempt)


def is_transient(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(fragment in text for fragment in TRANSIENT_ERRORS)


def is_store_failure(err: BaseException) -> bool:
    """Whether `err` comes from the tracking store being unusable (not from a mistake in the call)."""
    if is_transient(err):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"OperationalError", "ConnectionError", "Timeout", "ChunkedEncodingError"}:
        return True
    return getattr(err, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "ENDPOINT_NOT_FOUND")


class StoreError(RealignError):
    """The tracking store kept failing (or cannot be used at all): one line naming the store and the fix."""


def store_call(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` against the tracking store, retried with jittered backoff while the error is transient.

    What still fails after RETRY_BUDGET_S becomes a StoreError (one line, exit status 2 from the CLI).
    """
    deadline = time.monotonic() + RETRY_BUDGET_S
    delay = 0.1
    while True:
        try:
            return fn(*args, **kwargs)
        except RealignError:
            raise
        except Exception as err:
            if not is_transient(err):
                raise
            if time.monotonic() + delay > deadline:
                raise store_error(err) from None
        time.sleep(delay * (0.5 + random.random()))
        delay = min(2 * delay, 1.6)


def store_error(err: BaseException) -> StoreError:
    uri = tracking_uri()
    if "locked" in str(err).lower():
        return StoreError(f"tracking store {uri} stayed locked by another process ({_one_line(err)[:160]})",
                          "wait for the other process, or give each concurrent job a tracking server "
                          "(mlflow server) instead of one SQLite file")
    return StoreError(f"tracking store {uri} is not answering ({_one_line(err)[:160]})",
                      "start the server, or set MLFLOW_TRACKING_URI to a reachable server or a sqlite:/// path")


class _RetryingClient:
    """An MlflowClient whose every method call goes through `store_call`."""

    def __init__(self) -> None:
        self._client = store_call(_mlflow().MlflowClient)  # creating it may open (and migrate) the store

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        return functools.partial(store_call, attr) if callable(attr) else attr


def client() -> _RetryingClient:
    return _RetryingClient()


# -- the store, opened once --------------------------------------------------------------------------------------
_OPENED: set[str] = set()


def open_store() -> None:
    """Point MLflow at the configured store and prove it answers, before any work starts.

    A fresh SQLite file is created and migrated by one process at a time (a lock file beside it): several
    processes that open a new store at once would otherwise all run its schema migration and fail.
    """
    mlflow = _mlflow()
    uri = tracking_uri()
    # MLflow's own HTTP retries wait minutes on a dead server; store_call's few seconds decide instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(uri)
    if uri in _OPENED:
        return
    lock = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        folder = db_path.parent
        if not folder.is_dir():
            raise StoreError(f"tracking store {uri} is not writable: folder {folder} does not exist",
                             "create the folder, or set MLFLOW_TRACKING_URI to a writable sqlite:/// path "
                             "or a tracking server http://host:5000")
        if not os.access(folder, os.W_OK) or (db_path.exists() and not os.access(db_path, os.W_OK)):
            raise StoreError(f"tracking store {uri} is not writable",
                             "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a tracking server "
                             "http://host:5000")
        from realign.cache import exclusive_lock

        lock = exclusive_lock(db_path.with_name(db_path.name + ".lock"))
    with lock:
        try:
            client().search_experiments(max_results=1)  # creates and migrates a new store
        except RealignError:
            raise
        except Exception as err:  # not transient: a broken db, a wrong URL, a server that is no MLflow
            raise StoreError(f"cannot open tracking store {uri}: {_one_line(err)[:200]}",
                             "set MLFLOW_TRACKING_URI to a writable sqlite:/// path or a running mlflow server") \
                from None
    _OPENED.add(uri)


# -- where runs go -----------------------------------------------------------------------------------------------
_CLAIMED: set[str] = set()  # project runs (MLFLOW_RUN_ID) a stage or pipeline of this process has taken
_NEST_UNDER: list[str] = []  # open parent runs (a pipeline's) that new stage runs are nested under, innermost last


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
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client._client.create_experiment(name)
        except Exception as err:
            experiment = mlflow_client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:
                if is_transient(err):
                    raise store_error(err) from None
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RealignError(f"experiment {name!r} was deleted", f"restore it (mlflow experiments restore "
                           f"--experiment-id {experiment.experiment_id}) or pass another --experiment")
    return experiment.experiment_id


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


def note(line: str) -> None:
    """One line for the user on stderr (never stdout: the CLI's last stdout line is the run id)."""
    print(line, file=sys.stderr, flush=True)


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

    def log_prompt_set(self, prompts: list[str], path: str, name: str) -> None:
        """The harmful prompts an evaluation read from a file, as a run input (context `evaluation`)."""
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        ds = _mlflow().data.from_pandas(pd.DataFrame({"prompt": prompts}), source=str(Path(path).resolve()),
                                        name=name[:500])
        client().log_inputs(self.run_id, datasets=[
            DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])])

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
    def log_prompt_set(self, prompts: list[str], path: str, name: str) -> None: ...
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def log_adapter(self, adapter_dir: str | Path) -> None: ...
    def log_table(self, data: Any, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None: ...
    def mark_complete(self) -> None: ...


def resolve_run(ref: str, role: str, stages: tuple[str, ...], base_model: str,
                methods: tuple[str, ...] | None = None) -> InputRun:
    run_id = parse_run_ref(ref, role)
    try:
        run = client().get_run(run_id)
    except RealignError:
        raise
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
        path = store_call(mlflow.artifacts.download_artifacts, run_id=run_id, artifact_path=artifact,
                          dst_path=str(dst))
    except RealignError:
        raise
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


def harmful_verdicts(run_id: str) -> dict[str, bool] | None:
    """prompt_id -> flagged for the harmful prompts of a run's own evaluation (eval/generations.json); None
    when it logged none."""
    import json

    from realign.data.prompts import prompt_id

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
    rows = [dict(zip(columns, row)) for row in table.get("data", [])]
    return {row.get("prompt_id") or prompt_id(row["prompt"]): bool(row["flagged"])
            for row in rows if row.get("kind") == "harmful" and row.get("flagged") is not None}


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


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of each metric of run `run_id` (e.g. an input run's evaluation, shown next to a result)."""
    return dict(client().get_run(run_id).data.metrics)


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
        run_id = create_run(experiment_id, run_name or stage, base_tags)
    mark_dead_runs(experiment_id)
    return run_id


def claim_project_run(project: str, experiment: str) -> str:
    """Take the run `mlflow run` opened as this process's own; its experiment id.

    An explicit `experiment` that is not mlflow run's fails that run, in one line.
    """
    _CLAIMED.add(project)
    run = client().get_run(project)
    if run.info.status != "RUNNING":
        raise RealignError(f"the run mlflow run opened ({project}) is {run.info.status}, not RUNNING",
                           "start the stage again with mlflow run, or without MLFLOW_RUN_ID")
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


@contextlib.contextmanager
def parent_run(name: str, experiment: str, tags: dict[str, str]) -> Iterator[str]:
    """A run that groups stage runs (a pipeline); every stage run opened inside is nested under it.

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
        if project:
            own_tags["mlflow.parentRunId"] = project
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


def experiment_of(run_id: str) -> str:
    """The name of the experiment that holds `run_id`."""
    return client().get_experiment(client().get_run(run_id).info.experiment_id).name


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
