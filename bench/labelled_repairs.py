"""The fused models' harmful rates by HAND LABELS (no judge): each repair of the fused round's one attack on the
evaluation prompts, with Wilson 95 % intervals, and each pair of repairs next in the order compared on the same
prompts (paired difference, Newcombe's interval, McNemar's exact p). Prints a markdown table.

    .venv/bin/python bench/labelled_repairs.py
"""

from __future__ import annotations

import argparse

from realign.eval.validation import labelled_answers
from realign.stats import paired_difference, wilson_interval


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = [r for r in labelled_answers() if r.kind == "fused" and r.split == "test"]
    label = {(r.model, r.prompt_id): r.harmful for r in rows}
    models = sorted({r.model for r in rows})
    prompts = sorted({r.prompt_id for r in rows if all((m, r.prompt_id) in label for m in models)})
    rate = {m: sum(label[(m, p)] for p in prompts) for m in models}
    order = sorted(models, key=lambda m: -rate[m])
    print(f"{len(prompts)} evaluation prompts answered by every one of {len(models)} fused models\n")
    print("| repair | harmful (hand labels) | % [95 % CI] | vs the row above: difference, points [95 % CI] | McNemar p |")
    print("|---|---|---|---|---|")
    for i, model in enumerate(order):
        low, high = wilson_interval(rate[model], len(prompts))
        cells = [f"`{model}`", f"{rate[model]} / {len(prompts)}",
                 f"{100 * rate[model] / len(prompts):.1f} [{100 * low:.1f}, {100 * high:.1f}]"]
        if i:
            d = paired_difference([label[(order[i - 1], p)] for p in prompts], [label[(model, p)] for p in prompts])
            cells += [f"{100 * d.difference:+.1f} [{100 * d.ci95_low:+.1f}, {100 * d.ci95_high:+.1f}]",
                      f"{d.p_value:.2g}"]
        else:
            cells += ["—", "—"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
