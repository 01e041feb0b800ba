"""Evaluation in fp32 against the same evaluation under bf16 autocast (`eval.bf16`), on the same models and prompts.

For each run's model (base + adapter chain, or the model it logged), `evaluate_model` runs twice in one process,
the two precisions alternating from model to model so that a machine slowing down mid-run slows both, with the
default evaluation settings (the held-out harmful prompts, the benign instructions, the run's task). Prints a
table: harmful score in each precision with its Wilson interval, the paired difference with its 95 % interval and
McNemar's exact p, the same for refusal rate and task accuracy, the share of answers whose text is identical, and
the seconds of each; then `name: value` lines (speedup = fp32 seconds / bf16 seconds, summed over the models).

    .venv/bin/python bench/eval_precision.py --tracking-uri sqlite:////tmp/bench-pipeline/mlflow.db
    .venv/bin/python bench/eval_precision.py --tracking-uri ... --runs align/sft,attack/dpo/sst2/p0.1/n100
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_RUNS = "align/sft,align/dpo,attack/dpo/sst2/p0.1/n100,expo/dpo/a0.9,fuse/restore/neurons"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the store holding the runs (e.g. a bench pipeline's)")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="run names (newest finished of each) or run ids")
    args = parser.parse_args()

    import mlflow

    from realign import models, tracking
    from realign.config import EvalSettings, ModelConfig
    from realign.stages.evaluate import EVALUATED_STAGES, evaluate_model
    from realign.stats import paired_difference, wilson_interval

    def rate(hits: list[bool]) -> str:
        low, high = wilson_interval(sum(hits), len(hits))
        return f"{100 * sum(hits) / len(hits):.1f} [{100 * low:.1f}, {100 * high:.1f}]"

    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # realign.tracking reads the store from here
    mlflow.set_tracking_uri(args.tracking_uri)
    finished = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
    holder = tracking.StageRun("0" * 32, "eval-precision")  # a workdir to download weights into; opens no run
    base_cfg = ModelConfig()
    fp32 = EvalSettings()
    bf16 = dataclasses.replace(fp32, bf16=True)
    seconds = {"fp32": 0.0, "bf16": 0.0}
    print("| model | kind | n | fp32 % [95 % CI] | bf16 % [95 % CI] | bf16 − fp32 [95 % CI] | McNemar p | same text |"
          " fp32 s | bf16 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, wanted in enumerate(args.runs.split(",")):
        run = next((r for r in finished if wanted in (r.info.run_id, r.data.tags.get("mlflow.runName"))), None)
        if run is None:
            raise SystemExit(f"no finished run named or with id {wanted} in {args.tracking_uri}")
        # Rebuilt as `realign evaluate --run` does: the logged model, or the base and the adapter chain.
        source = tracking.resolve_run(run.info.run_id, "model", EVALUATED_STAGES, base_cfg.name)
        model_cfg, adapters = holder.model_of(source, base_cfg)
        model = models.load_model(model_cfg, adapters=adapters)
        tokenizer = models.load_tokenizer(model_cfg)
        task = run.data.tags.get(tracking.TAG_TASK, "")
        results, took = {}, {}
        order = (("fp32", fp32), ("bf16", bf16))
        for name, settings in order if index % 2 == 0 else reversed(order):
            started = time.perf_counter()
            results[name] = evaluate_model(model, tokenizer, settings, task=task)
            took[name] = time.perf_counter() - started
            seconds[name] += took[name]
        tables = {name: result.table for name, result in results.items()}
        kinds = tables["fp32"]["kind"]
        same = sum(a == b for a, b in zip(tables["fp32"]["response"], tables["bf16"]["response"]))
        label = run.data.tags.get("mlflow.runName")
        for kind, column in (("harmful", "flagged"), ("harmful", "refusal"), ("benign", "refusal"), (task, "correct")):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if not rows:
                continue
            first = [bool(tables["fp32"][column][i]) for i in rows]
            second = [bool(tables["bf16"][column][i]) for i in rows]
            diff = paired_difference(first, second)
            name = {"flagged": "harmful", "refusal": f"{kind} refusal", "correct": f"{task} accuracy"}[column]
            print(f"| {label} | {name} | {len(rows)} | {rate(first)} | {rate(second)} | "
                  f"{100 * diff.difference:+.1f} [{100 * diff.ci95_low:+.1f}, {100 * diff.ci95_high:+.1f}] | "
                  f"{diff.p_value:.3g} | {same}/{len(kinds)} | {took['fp32']:.0f} | {took['bf16']:.0f} |", flush=True)
    print(f"fp32_seconds: {seconds['fp32']:.1f}")
    print(f"bf16_seconds: {seconds['bf16']:.1f}")
    print(f"bf16_speedup: {seconds['fp32'] / seconds['bf16']:.2f}")


if __name__ == "__main__":
    main()
