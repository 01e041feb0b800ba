"""Running a search (`realign.search` reads and checks the file): the Optuna study, its trials as nested stage
runs under `search/<study>`, the Pareto front re-evaluated on the report half of the prompts.

- **Storage.** Optuna's RDB storage: `--storage` (any SQLAlchemy URL), else for a `sqlite:` tracking store a sibling
  file `<store>-optuna.db` (its own file: MLflow's and Optuna's schema migrations would share one alembic table),
  else `sqlite:///realign-search.db` in the working directory. The same study name again resumes the study; two
  processes may work on one study. Trials send heartbeats, so a trial whose process was killed is failed (and its
  MLflow run marked FAILED as a dead process's) when the study next runs, and the study goes on.
- **Trials.** Each trial samples the space (conditional parameters only where their `when` holds), then runs the
  file's steps in order with the sampled options, `eval.prompt_split=search`, and each `${step}` the trial's own run
  of it; a step whose resolved config equals a finished run's is reused (the pipeline's rule). New runs carry the
  tags `realign.study` and `realign.trial`. A failed step fails the trial (FAILED in MLflow, FAIL in the study)
  and the search goes on.
- **Report.** The Pareto-optimal trials' last runs are evaluated again on the report half (an evaluate run each,
  reused when it exists) and carry `report_<metric>`; the parent logs `search/pareto.json` (every trial) and the
  figure `figures/pareto.html`, and `search_seconds_per_trial`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from realign import tracking
from realign.errors import RealignError
from realign.search import STEP_REFERENCE, SearchSpec, load_search, resolve_newest

TAG_STUDY = "realign.study"
TAG_TRIAL = "realign.trial"
TAG_STORAGE = "realign.search_storage"
TAG_OBJECTIVES = "realign.search_objectives"
# The metrics realign's stages log that an objective may name (an evaluation's rates; fuse's changed share).
OBJECTIVE_METRICS = ("harmful_score", "refusal_rate", "benign_refusal_rate", "finetune_accuracy", "changed_fraction",
                     "replaced_module_fraction", "sst2_accuracy", "ag_news_accuracy", "gsm8k_accuracy",
                     "alpaca_rouge_l")


def default_storage(storage: str = "") -> str:
    if storage:
        return storage
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        stem = path[:-3] if path.endswith(".db") else path
        return f"sqlite:///{stem}-optuna.db"
    return "sqlite:///realign-search.db"


def make_sampler(name: str, seed: int):
    import optuna

    return {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler,
            "random": optuna.samplers.RandomSampler}[name](seed=seed)


def sampler_seed(seed: int, trials_before: int, worker: int) -> int:
    """The seed of this call's sampler: the file's seed, the trials the study held when this call began, and this
    process's rank among the processes working on the study. Without the last two a resumed study would sample
    the first call's points again, and two processes would sample the same points (and reuse each other's runs);
    with them a single process's study is still reproducible call by call."""
    import numpy as np

    return int(np.random.SeedSequence([seed, trials_before, worker]).generate_state(1)[0])


def open_study(spec: SearchSpec, storage_url: str, worker: int = 0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lock = contextlib.nullcontext()
    if storage_url.startswith("sqlite:///"):  # two processes creating one new file's schema at once would collide
        from realign.cache import exclusive_lock

        lock = exclusive_lock(Path(storage_url[len("sqlite:///"):] + ".lock"))
    directions = [direction for _, direction in spec.objectives]
    with lock:
        storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=5, grace_period=15,
                                             engine_kwargs={"connect_args": {"timeout": 60}}
                                             if storage_url.startswith("sqlite") else {})
        study = optuna.create_study(study_name=spec.study, storage=storage, directions=directions,
                                    sampler=make_sampler(spec.sampler, spec.seed), load_if_exists=True)
        if storage_url.startswith("sqlite:///"):  # two processes on one study read while the other writes
            tracking.use_wal(Path(storage_url[len("sqlite:///"):]))
    if [d.name.lower() for d in study.directions] != directions:
        raise RealignError(f"study {spec.study!r} in {storage_url} optimizes {[d.name.lower() for d in study.directions]}, "
                           f"the file asks for {directions}", "rename the study, or keep its objectives")
    optuna.storages.fail_stale_trials(study)
    study.sampler = make_sampler(spec.sampler, sampler_seed(spec.seed, len(study.trials), worker))
    return study


def check_spec(spec: SearchSpec) -> None:
    """Objectives realign logs, and every step's config resolvable at the first point of the space."""
    from realign.stages import stage_table

    for metric, _ in spec.objectives:
        if metric not in OBJECTIVE_METRICS:
            raise RealignError(f"{spec.path.name}: objective {metric!r} is not a metric realign's stages log",
                               f"use one of: {', '.join(OBJECTIVE_METRICS)}")
    probe = {p.name: (p.choices[0] if p.kind == "categorical" else p.low) for p in spec.space}
    for step, overrides in spec.steps.items():
        resolved = step_overrides(spec, step, probe, {s: f"{i + 1:032x}" for i, s in enumerate(spec.steps)})
        try:
            stage_table().get(overrides["stage"]).resolve_config(resolved)
        except RealignError as err:
            raise RealignError(f"{spec.path.name}, step {step}: {err.problem}", err.fix) from None


def step_overrides(spec: SearchSpec, step: str, values: dict[str, Any], run_ids: dict[str, str]) -> dict[str, Any]:
    """A step's overrides for one trial: the file's, the sampled ones, the search half of the prompts."""
    out: dict[str, Any] = {}
    for key, value in spec.steps[step].items():
        if key == "stage":
            continue
        if isinstance(value, str):
            value = STEP_REFERENCE.sub(lambda m: run_ids[m.group(1)], value)
        out[key] = value
    out.update({name.split(".", 1)[1]: value for name, value in values.items() if name.split(".", 1)[0] == step})
    out["eval.prompt_split"] = "search"
    if spec.model:
        out["model"] = spec.model
    return out


def run_trial(spec: SearchSpec, trial, experiment: str) -> list[float]:
    from realign.stages.pipeline import run_or_reuse

    values: dict[str, Any] = {}
    for param in spec.space:
        if param.applies(values):
            values[param.name] = param.suggest(trial)
    run_ids: dict[str, str] = {}
    with tracking.tagging_new_runs({TAG_STUDY: spec.study, TAG_TRIAL: str(trial.number)}):
        for step, overrides in spec.steps.items():
            resolved = {**step_overrides(spec, step, values, run_ids), "experiment": experiment}
            run_ids[step], _ = run_or_reuse(overrides["stage"], resolved, experiment)
            trial.set_user_attr(f"run:{step}", run_ids[step])
    metrics = tracking.run_metrics(run_ids[list(spec.steps)[-1]])
    missing = [m for m, _ in spec.objectives if m not in metrics]
    if missing:
        raise RealignError(f"trial {trial.number}: its last run logged no {missing[0]}",
                           "evaluate in that step (eval.enabled: true) or pick another objective")
    return [metrics[m] for m, _ in spec.objectives]


def _split(overrides: dict[str, Any]) -> tuple[str, int, Any, str, dict[str, Any]]:
    overrides = dict(overrides)
    name = str(overrides.pop("name", None) or "restore-smollm2")
    n_trials = int(overrides.pop("n_trials", None) or 12)
    if n_trials < 1:
        raise RealignError(f"n_trials={n_trials} must be >= 1", "pass --n-trials 12")
    timeout = overrides.pop("timeout", None)
    storage = str(overrides.pop("storage", None) or "")
    return name, n_trials, timeout, storage, overrides


def checked_search(overrides: dict[str, Any]) -> tuple[SearchSpec, int]:
    """The search file read with its overrides, and every step's config checked; (spec, n_trials)."""
    name, n_trials, _, _, rest = _split(overrides)
    spec = load_search(name, rest)
    check_spec(spec)
    return spec, n_trials


def plan_search(overrides: dict[str, Any]) -> str:
    """What `realign search --dry-run` prints: the file, its space and objectives, every step's config checked."""
    spec, n_trials = checked_search(overrides)
    lines = [f"{spec.path} (study {spec.study}, sampler {spec.sampler}, {n_trials} trials)"]
    lines += [f"  step {step}: {values['stage']}" for step, values in spec.steps.items()]
    lines += [f"  {p.name}: {p.kind} {list(p.choices) if p.choices else [p.low, p.high]}"
              + (f" when {p.when}" if p.when else "") for p in spec.space]
    lines += [f"  objective: {direction} {metric}" for metric, direction in spec.objectives]
    return "\n".join(lines)


def run_search(overrides: dict[str, Any]) -> str:
    """Run (or resume) a search: `n_trials` more trials in the study; returns the parent run's id."""
    return search(overrides, fill=False)[0]


def search(overrides: dict[str, Any], fill: bool) -> tuple[str, bool]:
    """(parent run id, reused). `fill=False`: run `n_trials` more trials. `fill=True` (a pipeline's search step):
    run only the trials the study lacks of `n_trials` in all, so a pipeline called again adds none; when it lacks
    none and a finished parent run of the study exists, that run is reused."""
    _, n_trials, timeout, storage, _ = _split(overrides)
    spec, _ = checked_search(overrides)
    tracking.open_store()
    experiment = tracking.experiment_name(spec.experiment)
    spec.steps = {step: {k: resolve_newest(v, spec.model or "smollm2-135m", experiment) for k, v in values.items()}
                  for step, values in spec.steps.items()}
    storage_url = default_storage(storage)
    if fill:
        ended = [t for t in open_study(spec, storage_url).trials if t.state.is_finished()]
        n_trials -= len(ended)
        previous = _finished_parent(spec.study, storage_url, experiment)
        if n_trials <= 0 and previous:
            print(f"search {spec.study}: {len(ended)} trials in the study already; reused run {previous}",
                  file=sys.stderr)
            return previous, True
    tags = {tracking.TAG_STAGE: "search", TAG_STUDY: spec.study, TAG_OBJECTIVES: objectives_tag(spec)}
    with tracking.parent_run(f"search/{spec.study}", experiment, tags) as parent_id:
        study = open_study(spec, storage_url, worker=_worker_rank(parent_id, spec.study, experiment))
        tracking.client().set_tag(parent_id, TAG_STORAGE, storage_url)
        started, before = time.monotonic(), len(study.trials)
        if n_trials > 0:
            bar = _bar(n_trials)

            def objective(trial):
                return run_trial(spec, trial, experiment)

            def progress(study, trial):
                bar.update(1)
                front = [t.values for t in study.best_trials]
                bar.set_postfix_str(f"front {len(front)}: " + "; ".join(
                    ", ".join(f"{v:.1f}" for v in values) for values in front[:3]))

            from realign.stages.score import keep_scores

            kept = keep_scores(int(spec.kept_scores_gb * 2**30)) if spec.kept_scores_gb > 0 else contextlib.nullcontext()
            with kept:
                study.optimize(objective, n_trials=n_trials, timeout=float(timeout) if timeout else None,
                               catch=(Exception,), callbacks=[progress])
            bar.close()
        ran = len(study.trials) - before
        if ran:
            tracking.client().log_metric(parent_id, "search_seconds_per_trial", (time.monotonic() - started) / ran)
        from realign.stages.search_report import log_front

        log_front(spec, study, parent_id, experiment)
        print(f"search {spec.study}: {ran} trials run, {len(study.trials)} in the study ({storage_url})",
              file=sys.stderr)
        return parent_id, False


def objectives_tag(spec: SearchSpec) -> str:
    """`harmful_score:minimize,finetune_accuracy:maximize`: how compare reads the parent's front table."""
    return ",".join(f"{metric}:{direction}" for metric, direction in spec.objectives)


def _search_parents(study: str, experiment: str, status: str):
    return tracking.search_runs(experiment, f"tags.`{tracking.TAG_STAGE}` = 'search' and tags.`{TAG_STUDY}` = "
                                            f"'{study}' and attributes.status = '{status}'")


def _finished_parent(study: str, storage_url: str, experiment: str) -> str:
    runs = _search_parents(study, experiment, "FINISHED")
    if runs.empty or f"tags.{TAG_STORAGE}" not in runs:
        return ""
    same = runs[runs[f"tags.{TAG_STORAGE}"] == storage_url]
    return str(same.iloc[0]["run_id"]) if not same.empty else ""


def _worker_rank(parent_id: str, study: str, experiment: str) -> int:
    """This process's place among the running searches of the study (oldest first); ranks differ whichever
    process looks first, since each sees its own parent run and every one made before it."""
    runs = _search_parents(study, experiment, "RUNNING")
    if runs.empty:
        return 0
    ordered = runs.sort_values(["start_time", "run_id"])["run_id"].tolist()
    return ordered.index(parent_id) if parent_id in ordered else 0


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="search", unit="trial")
