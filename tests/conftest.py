"""Shared fixtures: an isolated tracking store per test and small budgets for the tiny model."""

import os

import pytest

# No hub here: fail at once instead of retrying for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture
def tracking_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store; tests run in their own working dir so nothing leaks into the repo."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


# Budgets that make every alignment method train in seconds on the tiny model.
TINY = {
    "model": "tiny",
    "data.num_examples": "16",
    "train.max_steps": "2",
    "train.per_device_train_batch_size": "4",
    "train.max_length": "96",
    "train.learning_rate": "1e-2",
    "eval.num_prompts": "4",
    "eval.max_new_tokens": "8",
}


@pytest.fixture
def tiny_overrides():
    return dict(TINY)
