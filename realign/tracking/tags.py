"""The names realign gives MLflow tags, and the defaults of the store: part of what every run means."""

import re

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


TAG_DECODING = "realign.decoding"  # greedy,max_new_tokens=<n>[,bf16-autocast]


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
