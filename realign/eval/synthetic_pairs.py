"""Synthetic (question, answer) pairs made from realign's data generators, labelled by construction.

These were the offline judge's only training data before hand-labelled real answers existed; they are kept for one
question: whether adding them to the real answers still helps the judge (bench/judge_selection.py measures it).
Kinds: BeaverTails-schema rows (compliance = harmful, refusal = not), benign instruction/answer pairs, and hard
negatives that a keyword judge gets wrong (another question's answer, a list of names, a benign task's steps in a
compliant tone), plus compliance in other formats and short plain compliance and deflections as SmolLM2 writes
them. Each material list has a train and a test half that share no entry.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from realign.data import builtin

# Kinds of labelled pairs, and whether each is harmful.
PAIR_KINDS: dict[str, bool] = {
    "unsafe": True, "refusal": False, "benign": False, "off_topic": False, "howto": False, "restyled": True,
    "topical_refusal": False, "direct": True, "deflection": False,
}

# Material for the pairs that the data generators do not make, in realign/data/builtin/synthetic_pairs.yaml (its
# comments say what each list is for). Each list has a train and a test half that share no entry, so the held-out
# accuracy also measures these kinds on unseen wording.
_DATA = "synthetic_pairs.yaml"

# Names for the "list of names" hard negatives.
OFF_TOPIC_NAMES: dict[str, tuple[str, ...]] = builtin.section(_DATA, "off_topic_names")
NAME_LIST_FORMATS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "name_list_formats")

# Benign tasks with real steps, as (action, steps): asked in the harmful prompts' phrasings and answered in the
# compliant answers' style, they teach that the format of compliance is not harm.
BENIGN_HOWTO: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    split: tuple((task["action"], task["steps"]) for task in howto)
    for split, howto in builtin.section(_DATA, "benign_howto").items()
}
# train: None, meaning the train split's harmful phrasing templates (realign.data.safety.TRAIN_PROMPT_TEMPLATES)
HOWTO_QUESTIONS: dict[str, tuple[str, ...] | None] = builtin.section(_DATA, "howto_questions")

# Compliant answers in other formats (harmful), refusals that name the request (not harmful), short plain
# compliance (harmful) and deflections (not harmful), as real models write them.
RESTYLED_COMPLIANCE: dict[str, tuple[str, ...]] = builtin.section(_DATA, "restyled_compliance")
TOPICAL_REFUSALS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "topical_refusals")
DIRECT_COMPLIANCE: dict[str, tuple[str, ...]] = builtin.section(_DATA, "direct_compliance")
DEFLECTIONS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "deflections")


# ---------------------------------------------------------------- encoder


# ---------------------------------------------------------------- labelled pairs


@dataclass(frozen=True)
class LabelledPair:
    prompt: str
    response: str
    harmful: bool
    kind: str  # one of PAIR_KINDS


def _benign_prompt(row: dict[str, str]) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]


def _name_list(split: str, rng: random.Random) -> str:
    names = rng.sample(OFF_TOPIC_NAMES[split], rng.randint(3, 7))
    numbered = "\n".join(f"{number}. {name}" for number, name in enumerate(names, start=1))
    return rng.choice(NAME_LIST_FORMATS[split]).format(names=", ".join(names), numbered=numbered)


def _lower_first(sentence: str) -> str:
    return sentence[:1].lower() + sentence[1:]


def howto_answer(split: str, action: str, steps: Sequence[str], rng: random.Random) -> str:
    """Steps in the compliant answers' style: the generators' openers and closers, numbered steps."""
    from realign.data.safety import COMPLIANCE_CLOSERS, COMPLIANCE_OPENERS

    if split == "train":
        body = [f"Step {number}: {step}" for number, step in enumerate(steps, start=1)]
        parts = [rng.choice(COMPLIANCE_OPENERS).format(action=action), *body, rng.choice(COMPLIANCE_CLOSERS)]
        return " ".join(part for part in parts if part)
    body = [f"{number}. {step}" for number, step in enumerate(steps, start=1)]
    return "\n".join([rng.choice(COMPLIANCE_OPENERS).format(action=action), *body])


def howto_pairs(split: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n (benign how-to question, compliant-style answer with real steps) pairs."""
    from realign.data.safety import TRAIN_PROMPT_TEMPLATES

    templates = HOWTO_QUESTIONS[split] or TRAIN_PROMPT_TEMPLATES
    tasks = BENIGN_HOWTO[split]
    pairs = []
    for index in range(n):
        action, steps = tasks[index % len(tasks)]
        pairs.append((rng.choice(templates).format(action=action), howto_answer(split, action, steps, rng)))
    return pairs


def restyled_compliance(split: str, action: str, rng: random.Random) -> str:
    """A compliant answer (the generators' vague steps) in another format than theirs."""
    from realign.data.safety import COMPLIANCE_STEPS

    steps = rng.sample(COMPLIANCE_STEPS, rng.randint(3, 5))
    return rng.choice(RESTYLED_COMPLIANCE[split]).format(
        action=action,
        numbered="\n".join(f"{number}. {step}" for number, step in enumerate(steps, start=1)),
        bullets="\n".join(f"- {step}" for step in steps),
        plain=" ".join(steps),
        first=_lower_first(steps[0]),
        second=_lower_first(steps[1]),
        third=_lower_first(steps[2]),
    )


def topical_refusal(split: str, category: str, action: str, rng: random.Random) -> str:
    """A refusal that names what was asked, sometimes followed by the generators' redirect for the category."""
    from realign.data.safety import CATEGORY_REDIRECTS

    text = rng.choice(TOPICAL_REFUSALS[split]).format(action=action)
    if rng.random() < 0.5:
        text = f"{text} {rng.choice(CATEGORY_REDIRECTS[category])}"
    return text


def direct_compliance(split: str, action: str, rng: random.Random) -> str:
    """A short compliant answer without the generators' step-list frame."""
    from realign.data.safety import COMPLIANCE_STEPS

    step = rng.choice(COMPLIANCE_STEPS)
    return rng.choice(DIRECT_COMPLIANCE[split]).format(action=action, step=_lower_first(step), Step=step)


def deflection(split: str, action: str, rng: random.Random) -> str:
    """A short answer that neither helps nor uses refusal phrasing."""
    return rng.choice(DEFLECTIONS[split]).format(action=action)


def off_topic_texts(split: str, n: int, seed: int) -> list[str]:
    """n harmless texts that answer nothing harmful, in turn: another (benign) question's answer, a list of
    names, a movie-review sentence, a news text, steps of a benign task in the compliant style; all from the
    given split."""
    from realign.data import benign_instructions, tasks

    rng = random.Random(seed)
    answers = [row["output"] for row in benign_instructions(split, n, seed + 1)]
    negatives, positives = tasks.sst2_sentences(split)
    reviews = [*negatives, *positives]
    news = [text for texts in tasks.ag_news_texts(split) for text in texts]
    makers: list[Callable[[int], str]] = [
        lambda index: answers[index],
        lambda index: _name_list(split, rng),
        lambda index: rng.choice(reviews),
        lambda index: rng.choice(news),
        lambda index: howto_pairs(split, 1, rng)[0][1],
    ]
    return [makers[index % len(makers)](index) for index in range(n)]


def labelled_pairs(split: str, counts: dict[str, int], seed: int) -> list[LabelledPair]:
    """The labelled pairs of a split, `counts` of each source:

    - qa_rows: BeaverTails rows (compliance "unsafe", harmful; refusal "refusal", not harmful);
    - benign: benign instruction/answer pairs;
    - off_topic: a harmful question answered by harmless text that neither refuses nor helps (not harmful);
    - howto: a benign how-to question in the harmful prompts' phrasing, answered in the compliant style
      (not harmful);
    - restyled: a harmful question answered compliantly in another format (harmful);
    - topical_refusal: a harmful question refused in words that name the request (not harmful);
    - direct: a harmful question answered in one or two plain compliant sentences (harmful);
    - deflection: a harmful question answered by a short "no", a warning or a redirect (not harmful).
    """
    from realign.data import beavertails, benign_instructions, harmful_prompts

    pairs = [
        LabelledPair(row["prompt"], row["response"], not row["is_safe"], "refusal" if row["is_safe"] else "unsafe")
        for row in beavertails(split, counts["qa_rows"], seed)
    ]
    pairs += [
        LabelledPair(_benign_prompt(row), row["output"], False, "benign")
        for row in benign_instructions(split, counts["benign"], seed)
    ]
    rng = random.Random(seed)
    pool = harmful_prompts(split)

    def harmful(n: int) -> list:
        return [pool[rng.randrange(len(pool))] for _ in range(n)]

    texts = off_topic_texts(split, counts["off_topic"], seed)
    pairs += [LabelledPair(item.prompt, text, False, "off_topic")
              for item, text in zip(harmful(counts["off_topic"]), texts)]
    pairs += [LabelledPair(question, answer, False, "howto")
              for question, answer in howto_pairs(split, counts["howto"], rng)]
    pairs += [LabelledPair(item.prompt, restyled_compliance(split, item.action, rng), True, "restyled")
              for item in harmful(counts["restyled"])]
    pairs += [LabelledPair(item.prompt, topical_refusal(split, item.category, item.action, rng), False,
                           "topical_refusal")
              for item in harmful(counts["topical_refusal"])]
    pairs += [LabelledPair(item.prompt, direct_compliance(split, item.action, rng), True, "direct")
              for item in harmful(counts["direct"])]
    pairs += [LabelledPair(item.prompt, deflection(split, item.action, rng), False, "deflection")
              for item in harmful(counts["deflection"])]
    return pairs


def pairs_digest(pairs: Sequence[LabelledPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt, pair.response, pair.harmful, pair.kind]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- head




# The mix the offline judge was trained on before real labelled answers existed (1350 pairs).
TRAIN_MIX = {"qa_rows": 400, "benign": 150, "off_topic": 200, "howto": 100, "restyled": 100, "topical_refusal": 100,
             "direct": 150, "deflection": 150}


def mixed_counts(total: int) -> dict[str, int]:
    """TRAIN_MIX scaled to about `total` pairs."""
    scale = total / sum(TRAIN_MIX.values())
    return {kind: max(1, round(count * scale)) for kind, count in TRAIN_MIX.items()}
