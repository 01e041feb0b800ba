"""`realign register --run ID --name NAME`, and `--register NAME` on align, expo and fuse: the run's model as an
MLflow model in the Model Registry.

The run's weights are rebuilt as every stage rebuilds an input (the base plus its adapter chain merged, or the full
weights a merged EXPO or fuse run logged), saved in MLflow's transformers flavor with the tokenizer into the same
run (`mlflow-model/`), and registered as a new version of NAME. The version's tags carry the run's lineage (stage,
method, base model, input runs) and its headline metrics with their intervals; its source is the run, so
`models:/NAME/<version>` is also accepted wherever realign takes a run id.
"""

from __future__ import annotations

import shutil

from realign import models, tracking
from realign.config import ModelConfig

VERSION_METRICS = ("harmful_score", "harmful_score_ci95_low", "harmful_score_ci95_high", "harmful_score_n",
                   "finetune_accuracy", "finetune_accuracy_ci95_low", "finetune_accuracy_ci95_high",
                   "benign_refusal_rate", "changed_fraction")


def model_config_of(params: dict[str, str], base_model: str) -> ModelConfig:
    """The model config a run was made with, from its logged params."""
    def value(key: str) -> str | None:
        text = params.get(f"model.{key}", "")
        return None if text in ("", "None") else text

    return ModelConfig(name=base_model, source=value("source") or "smollm2", path=value("path"),
                       revision=value("revision"), dtype=value("dtype") or "float32")


def version_tags(run) -> dict[str, str]:
    """Lineage and headline metrics of the run, as tags of the model version."""
    tags = {key: value for key, value in run.data.tags.items()
            if key.startswith(tracking.TAG_SOURCE) or key in (tracking.TAG_STAGE, tracking.TAG_METHOD,
                                                              tracking.TAG_BASE_MODEL, tracking.TAG_JUDGE,
                                                              tracking.TAG_PROMPTS, "mlflow.runName")}
    tags["realign.run"] = run.info.run_id
    for metric in VERSION_METRICS:
        if metric in run.data.metrics:
            tags[metric] = f"{run.data.metrics[metric]:g}"
    return tags


def register_run(run_ref: str, name: str) -> tuple[str, str]:
    """Register the model of run `run_ref` as a new version of `name`; (name, version)."""
    tracking.open_store()
    tracking.check_model_name(name)
    run_id = tracking.parse_run_ref(run_ref, "registered")
    run = tracking.client().get_run(run_id)
    source = tracking.resolve_run(run_id, "registered", tracking.REGISTERED_STAGES,
                                  run.data.tags.get(tracking.TAG_BASE_MODEL, ""))
    reader = tracking.StageRun(run_id, "register")  # for its downloads only: it writes nothing to the run
    try:
        model_cfg, adapters = reader.model_of(source, model_config_of(source.params, source.base_model))
        model = models.load_model(model_cfg, adapters, device="cpu")
        tokenizer = models.load_tokenizer(model_cfg)
        version = tracking.log_and_register(run_id, name, model, tokenizer, version_tags(run))
    finally:
        shutil.rmtree(reader.workdir, ignore_errors=True)
    return version.name, str(version.version)
