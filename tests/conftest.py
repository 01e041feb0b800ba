"""Shared fixtures: an isolated tracking store per test and small budgets for the tiny model."""

import contextlib
import os
import tempfile

import pytest

# No hub here: fail at once instead of retrying for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Trainer checkpoints of the tests stay out of the user's cache (a killed test must not leave one to resume).
os.environ.setdefault("REALIGN_CHECKPOINT_DIR", tempfile.mkdtemp(prefix="realign-test-checkpoints-"))


@contextlib.contextmanager
def module_store(tmp_path_factory, name):
    """A sqlite store for one test module, whose chain of input runs is built once inside this context.

    Yields (folder, uri); the module's `chain` fixture returns a dict with at least "uri", which `store` uses.
    """
    import mlflow

    folder = tmp_path_factory.mktemp(name)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        yield folder, uri


def free_port() -> int:
    """A loopback port nothing listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium (tests/browser.py); tests that take it skip where Chromium is not installed."""
    from browser import CHROMIUM, Chromium

    if CHROMIUM is None:
        pytest.skip("chromium not installed: apt install chromium")
    chromium = Chromium(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def wait_for_health(url, process, seconds, what="mlflow server", log=None):
    """Until `url`/health answers 200; fails the test if `process` exits first (with `log`'s tail) or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited: {log.read_text()[-2000:] if log else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{what} did not answer /health within {seconds} s")


def stand_in_adapter(folder):
    """A PEFT-shaped folder for hand-logged runs that a check must refuse before any model is built.

    Its weights file is valid safetensors (artifact integrity is checked on download) holding one zero tensor:
    no test loads it as an adapter. Returns the folder.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    save_file({"unused": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    return folder


def assert_adapter_changes_tiny_model(adapter_dir):
    """The adapter, put on the tiny base model, changes its logits (a trained adapter is never a no-op)."""
    import torch
    from peft import PeftModel

    from realign import models
    from realign.config import ModelConfig

    peft_model = PeftModel.from_pretrained(models.load_model(ModelConfig(name="tiny", source="tiny")), str(adapter_dir))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        with peft_model.disable_adapter():
            before = peft_model(ids).logits
        after = peft_model(ids).logits
    assert not torch.allclose(before, after), "the adapter must change the model's outputs"


@pytest.fixture
def store(chain, monkeypatch, tmp_path):
    """The module's store (its `chain` fixture) from a fresh working directory: stages find inputs by run id."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", chain["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(chain["uri"])
    yield chain
    while mlflow.active_run() is not None:
        mlflow.end_run()


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
    "sft_run": "none",
    "data.num_examples": "16",
    "train.max_steps": "2",
    "train.per_device_train_batch_size": "4",
    "train.max_length": "96",
    "train.learning_rate": "1e-2",
    "eval.judge": "keyword",  # mechanics tests stay independent of the classifier judge's one-off build
    "eval.num_prompts": "4",
    "eval.max_new_tokens": "8",
}


@pytest.fixture
def tiny_overrides():
    return dict(TINY)


@pytest.fixture(scope="session")
def smollm2_chain(tmp_path_factory):
    """One SmolLM2 chain shared by every effect test: base evaluation, then align/sft -> align/dpo.

    Budgets are the offline recipes' own (conf/align/*.yaml): what `realign align --method dpo` runs.
    """
    import mlflow

    from realign import models
    from realign.config import EvalSettings, ModelConfig
    from realign.stages.align import run_align
    from realign.stages.evaluate import evaluate_model

    folder = tmp_path_factory.mktemp("smollm2-chain")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        base_cfg = ModelConfig()
        base_eval = evaluate_model(models.load_model(base_cfg), models.load_tokenizer(base_cfg), EvalSettings())
        dpo_id = run_align({"method": "dpo"})
        sft_id = mlflow.get_run(dpo_id).data.tags["realign.source.sft"]
        chain = {
            "uri": uri,
            "base": base_eval.metrics,
            "sft": mlflow.get_run(sft_id).data.metrics,
            "dpo": mlflow.get_run(dpo_id).data.metrics,
            "sft_id": sft_id,
            "dpo_id": dpo_id,
        }
        print("\nsmollm2 chain:", {k: v for k, v in chain.items() if k in ("base", "sft", "dpo")})
        yield chain
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
