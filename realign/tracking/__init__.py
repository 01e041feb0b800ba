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

from realign.tracking.tags import (
    TAG_STAGE, TAG_METHOD, TAG_BASE_MODEL, TAG_SOURCE, TAG_ERROR, TAG_JUDGE, TAG_JUDGE_HASH,
    TAG_JUDGE_THRESHOLD, TAG_PROMPTS, TAG_PROMPTS_DIGEST, TAG_DECODING, SCORE_IDENTITY_TAGS, TAG_TASK,
    TAG_COMPLETE, TAG_ADAPTER_BASE, TAG_ADAPTER_INIT, TAG_OUTPUT, TAG_SWEEP, TAG_CODE_VERSION, TAG_PIPELINE,
    TAG_PROCESS, TAG_RESUMED_FROM, MULTI_PROCESS_STAGES, DEFAULT_TRACKING_URI, DEFAULT_EXPERIMENT,
)
from realign.tracking.store import (
    tracking_uri, TRANSIENT_ERRORS, RETRY_BUDGET_S, is_transient, is_store_failure, StoreError, store_call,
    store_error, client, open_store, use_wal, note, code_version,
)
from realign.tracking.experiments import (
    project_run_id, experiment_name, get_or_create_experiment, search_runs, run_metrics, load_run_table,
    harmful_verdicts, task_correct, load_evaluation_rows, adapter_root, latest_run, elsewhere_hint, to_realign_experiment, find_reusable_run, experiment_of,
)
from realign.tracking.inputs import (
    InputRun, parse_run_ref, registered_run_id, resolve_run, download_artifact, check_artifact_files,
)
from realign.tracking.models import MODEL_ARTIFACT, REGISTERED_STAGES, check_model_name, log_and_register
from realign.tracking.runs import (
    StageRun, ReplicaRun, stage_run, claim_project_run, fail_project_run, create_run, end_run, child_run,
    this_process, process_is_alive, mark_dead_runs, mark_abandoned, copy_evaluation, parent_run, nested_under,
    tagging_new_runs,
    log_parent_table, metrics_callback,
)

__all__ = [
    'TAG_STAGE', 'TAG_METHOD', 'TAG_BASE_MODEL', 'TAG_SOURCE', 'TAG_ERROR', 'TAG_JUDGE', 'TAG_JUDGE_HASH',
    'TAG_JUDGE_THRESHOLD', 'TAG_PROMPTS', 'TAG_PROMPTS_DIGEST', 'TAG_DECODING', 'SCORE_IDENTITY_TAGS',
    'TAG_TASK', 'TAG_COMPLETE', 'TAG_ADAPTER_BASE', 'TAG_ADAPTER_INIT', 'TAG_OUTPUT', 'TAG_SWEEP',
    'TAG_CODE_VERSION', 'TAG_PIPELINE', 'TAG_PROCESS', 'TAG_RESUMED_FROM', 'MULTI_PROCESS_STAGES',
    'DEFAULT_TRACKING_URI', 'DEFAULT_EXPERIMENT', 'tracking_uri', 'TRANSIENT_ERRORS', 'RETRY_BUDGET_S',
    'is_transient', 'is_store_failure', 'StoreError', 'store_call', 'store_error', 'client', 'open_store', 'use_wal',
    'note', 'code_version', 'project_run_id', 'experiment_name', 'get_or_create_experiment', 'search_runs',
    'run_metrics', 'load_run_table', 'harmful_verdicts', 'task_correct', 'load_evaluation_rows', 'adapter_root', 'latest_run', 'elsewhere_hint',
    'to_realign_experiment', 'find_reusable_run', 'experiment_of', 'InputRun', 'parse_run_ref', 'registered_run_id', 'MODEL_ARTIFACT', 'REGISTERED_STAGES', 'check_model_name', 'log_and_register',
    'resolve_run',
    'download_artifact', 'check_artifact_files', 'StageRun', 'ReplicaRun', 'stage_run', 'claim_project_run',
    'fail_project_run', 'create_run', 'end_run', 'child_run', 'this_process', 'process_is_alive',
    'mark_dead_runs', 'mark_abandoned', 'copy_evaluation', 'parent_run', 'nested_under', 'tagging_new_runs', 'log_parent_table',
    'metrics_callback',
]
