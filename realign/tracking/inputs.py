"""Input runs: a run id or runs:/ URI checked (stage, method, base model, FINISHED and complete) and its artifacts
downloaded and checked to parse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from realign.errors import RealignError
from realign.tracking.store import _mlflow, _one_line, client, store_call, tracking_uri
from realign.tracking.tags import TAG_ADAPTER_BASE, TAG_BASE_MODEL, TAG_COMPLETE, TAG_METHOD, TAG_STAGE, _RUN_ID



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
    """A bare run id, a `runs:/<id>[/path]` URI, or a registered `models:/<name>/<version>` -> the run id."""
    text = ref.strip()
    if text.startswith("models:/"):
        return registered_run_id(text, role)
    if text.startswith("runs:/"):
        text = text[len("runs:/"):].split("/", 1)[0]
    if not _RUN_ID.match(text):
        raise RealignError(f"{role} run {ref!r} is not a run id",
                           "pass a 32-hex run id, runs:/<run_id> or models:/<registered name>/<version>")
    return text


def registered_run_id(uri: str, role: str) -> str:
    """The run a registered model version came from (`realign register` logs it in that run)."""
    name, _, version = uri[len("models:/"):].rstrip("/").rpartition("/")
    if not name or not version.isdigit():
        raise RealignError(f"{role} {uri!r} is not a registered model version",
                           "write models:/<name>/<version>, e.g. models:/smollm2-restored/1")
    try:
        model_version = client().get_model_version(name, version)
    except RealignError:
        raise
    except Exception:
        raise RealignError(f"{role} {uri}: no version {version} of registered model {name!r} in {tracking_uri()}",
                           "list them with `mlflow ui` (Models) or register one: realign register --run ID --name NAME"
                           ) from None
    if not model_version.run_id:
        raise RealignError(f"{role} {uri} was not registered from a run", "pass the run id it was made in")
    return model_version.run_id


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
