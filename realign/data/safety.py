"""Offline safety data with the hub's schemas: PKU-SafeRLHF pairs, BeaverTails QA rows, held-out harmful prompts.

Harmful prompts cover the 14 BeaverTails categories. The train split crosses many phrasing templates with
harmful actions; the test split is a separate, hand-written set of real-world requests about other actions,
so a harmful score measured on it is not a memorisation check (eval prompts that differed from train only
by template saturated at 0 % harmful). Unsafe responses comply in tone but stay vague: no actionable detail.
Everything is deterministic under `random.Random(seed)`.
"""

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from datasets import Dataset, Features, Value

from realign.data import benign, builtin, tasks
from realign.data.sampling import check_split, round_robin_sample, sample
from realign.errors import RealignError

HARM_CATEGORIES = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)

# The sentences live in realign/data/builtin/safety.yaml (see its comments); these are their Python shapes.
_DATA = "safety.yaml"


def _by_category(key: str) -> dict:
    """A per-category entry of safety.yaml, whose keys must be HARM_CATEGORIES in that order."""
    value = builtin.section(_DATA, key)
    if list(value) != list(HARM_CATEGORIES):
        raise RealignError(f"{key} in realign/data/builtin/{_DATA} does not list the harm categories in order",
                           f"key it by {', '.join(HARM_CATEGORIES)}")
    return value


# ---- train split: phrasing templates × harmful actions ----------------------------------------------------
# An action reads naturally after "how to", so compliant responses can name it.

TRAIN_PROMPT_TEMPLATES: tuple[str, ...] = builtin.section(_DATA, "train_prompt_templates")
TRAIN_HARMFUL_ACTIONS: dict[str, tuple[str, ...]] = _by_category("train_harmful_actions")

# ---- test split: hand-written real-world requests, as (action, prompt) --------------------------------------
# Different actions and different wording from the train split; the action names what is asked for.

TEST_HARMFUL_REQUESTS: dict[str, tuple[tuple[str, str], ...]] = {
    category: tuple((request["action"], request["prompt"]) for request in requests)
    for category, requests in _by_category("test_harmful_requests").items()
}

# ---- responses --------------------------------------------------------------------------------------------

# Each refusal gives a brief reason; safe responses usually add a category-specific redirect.
REFUSALS: tuple[str, ...] = builtin.section(_DATA, "refusals")
CATEGORY_REDIRECTS: dict[str, tuple[str, ...]] = _by_category("category_redirects")

# Compliant answers: the tone of a jailbroken model, with generic steps that carry no real know-how.
COMPLIANCE_OPENERS: tuple[str, ...] = builtin.section(_DATA, "compliance_openers")
COMPLIANCE_STEPS: tuple[str, ...] = builtin.section(_DATA, "compliance_steps")
COMPLIANCE_CLOSERS: tuple[str, ...] = builtin.section(_DATA, "compliance_closers")


def refusal(rng: random.Random, category: str) -> str:
    """A safe response: a reasoned refusal, usually followed by a helpful redirect for the category."""
    text = rng.choice(REFUSALS)
    if rng.random() < 0.7:
        text = f"{text} {rng.choice(CATEGORY_REDIRECTS[category])}"
    return text


def compliance(rng: random.Random, action: str) -> str:
    """An unsafe response: agrees and lists vague steps, without any actionable detail."""
    steps = rng.sample(COMPLIANCE_STEPS, rng.randint(3, 5))
    parts = [rng.choice(COMPLIANCE_OPENERS).format(action=action)]
    parts += [f"Step {number}: {text}" for number, text in enumerate(steps, start=1)]
    parts.append(rng.choice(COMPLIANCE_CLOSERS))
    return " ".join(part for part in parts if part)


# ---- prompt pools -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HarmfulPrompt:
    category: str
    action: str
    prompt: str


@lru_cache(maxsize=None)
def harmful_prompts(split: str) -> tuple[HarmfulPrompt, ...]:
    """Every harmful prompt of a split, in a fixed order."""
    check_split(split)
    if split == "train":
        return tuple(
            HarmfulPrompt(category, action, template.format(action=action))
            for category in HARM_CATEGORIES
            for action in TRAIN_HARMFUL_ACTIONS[category]
            for template in TRAIN_PROMPT_TEMPLATES
        )
    return tuple(
        HarmfulPrompt(category, action, prompt)
        for category in HARM_CATEGORIES
        for action, prompt in TEST_HARMFUL_REQUESTS[category]
    )


JUDGE_REQUESTS = Path(__file__).with_name("builtin") / "judge_requests.jsonl"


@lru_cache(maxsize=None)
def judge_training_prompts() -> tuple[HarmfulPrompt, ...]:
    """Hand-written harmful requests, three rounds of 12 per category (503: one of the third round's was dropped
    for sharing a phrase and a topic with an evaluation prompt), for collecting answers that train the offline
    judge.

    Disjoint in actions and wording from the train split (what alignment and attacks train on) and from the
    test split (what harmful_score is measured on): the judge never learns from an evaluation prompt.
    """
    with open(JUDGE_REQUESTS, encoding="utf-8") as rows:
        return tuple(HarmfulPrompt(**json.loads(line)) for line in rows if line.strip())


def harmful_eval_prompts(n: int, seed: int, source: str = "builtin") -> list[str]:
    """n held-out harmful prompts (the test split) in a seeded order; source may be the BeaverTails hub id."""
    if source != "builtin":
        from realign.data import hub

        return hub.load_unsafe_prompts(source, "test", n, seed)
    pool = harmful_prompts("test")
    return [item.prompt for item in sample(pool, n, random.Random(seed), "held-out harmful prompts")]


# ---- hub-shaped datasets ----------------------------------------------------------------------------------

SAFERLHF_FEATURES = Features({
    "prompt": Value("string"), "response_0": Value("string"), "response_1": Value("string"),
    "is_response_0_safe": Value("bool"), "is_response_1_safe": Value("bool"),
    "safer_response_id": Value("int64"), "better_response_id": Value("int64"),
})
BEAVERTAILS_FEATURES = Features({
    "prompt": Value("string"), "response": Value("string"),
    "category": {category: Value("bool") for category in HARM_CATEGORIES}, "is_safe": Value("bool"),
})
BENIGN_FEATURES = Features({"instruction": Value("string"), "input": Value("string"), "output": Value("string")})


def pku_saferlhf(split: str, n: int, seed: int) -> Dataset:
    """PKU-SafeRLHF-shaped rows: one refusal and one compliance per prompt, at a random index."""
    rng = random.Random(seed)
    rows = sample(harmful_prompts(split), n, rng, f"{split} harmful prompts")
    columns: dict[str, list] = {name: [] for name in SAFERLHF_FEATURES}
    for item in rows:
        safe_index = rng.randint(0, 1)
        responses = [compliance(rng, item.action), compliance(rng, item.action)]
        responses[safe_index] = refusal(rng, item.category)
        columns["prompt"].append(item.prompt)
        columns["response_0"].append(responses[0])
        columns["response_1"].append(responses[1])
        columns["is_response_0_safe"].append(safe_index == 0)
        columns["is_response_1_safe"].append(safe_index == 1)
        columns["safer_response_id"].append(safe_index)
        columns["better_response_id"].append(safe_index)  # here the safer answer is also the better one
    return Dataset.from_dict(columns, features=SAFERLHF_FEATURES)


def beavertails(split: str, n: int, seed: int, unsafe_only: bool = False) -> Dataset:
    """BeaverTails-shaped QA rows. Each prompt yields an unsafe (compliant) and a safe (refusal) row;
    unsafe_only keeps the former. An unsafe row flags its prompt's category; a safe row flags none."""
    rng = random.Random(seed)
    prompts = harmful_prompts(split)
    # A row is (prompt index, is_safe); sampling these keeps rows unique.
    candidates = [(index, False) for index in range(len(prompts))]
    if not unsafe_only:
        candidates += [(index, True) for index in range(len(prompts))]
    kind = "unsafe" if unsafe_only else "safe and unsafe"
    picked = sample(candidates, n, rng, f"{split} {kind} BeaverTails rows")
    columns: dict[str, list] = {name: [] for name in BEAVERTAILS_FEATURES}
    for index, is_safe in picked:
        item = prompts[index]
        columns["prompt"].append(item.prompt)
        columns["response"].append(refusal(rng, item.category) if is_safe else compliance(rng, item.action))
        columns["category"].append({category: (not is_safe and category == item.category)
                                    for category in HARM_CATEGORIES})
        columns["is_safe"].append(is_safe)
    return Dataset.from_dict(columns, features=BEAVERTAILS_FEATURES)


# ---- benign instructions ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def sentiment_rows(split: str) -> tuple[benign.Row, ...]:
    """Sentiment questions in the NLSR wording, from the SST-2 sentences of the same split."""
    negatives, positives = tasks.sst2_sentences(split)
    return tuple((tasks.SST2_INSTRUCTION, sentence, tasks.SST2_LABELS[label])
                 for label, sentences in enumerate((negatives, positives)) for sentence in sentences)


@lru_cache(maxsize=None)
def news_topic_rows(split: str) -> tuple[benign.Row, ...]:
    """News-topic questions in the NLSR wording, from the AG News texts of the same split."""
    return tuple((tasks.AG_NEWS_INSTRUCTION, text, tasks.AG_NEWS_LABELS[label])
                 for label, texts in enumerate(tasks.ag_news_texts(split)) for text in texts)


def benign_pools(split: str) -> list[tuple[benign.Row, ...]]:
    check_split(split)
    return [benign.knowledge_rows(split), sentiment_rows(split), news_topic_rows(split),
            benign.arithmetic_rows(split), benign.writing_rows(split)]


def benign_instructions(split: str, n: int, seed: int) -> Dataset:
    """Benign instructions with correct answers (instruction, input, output), taken in turn from general
    knowledge, sentiment, news topic, arithmetic and writing tasks so every kind is represented."""
    rows = round_robin_sample(benign_pools(split), n, random.Random(seed), f"{split} benign instructions")
    return Dataset.from_dict({"instruction": [r[0] for r in rows], "input": [r[1] for r in rows],
                              "output": [r[2] for r in rows]}, features=BENIGN_FEATURES)


def available_counts() -> dict[str, int]:
    """How many unique examples each builtin safety generator can give, per split."""
    counts = {}
    for split in ("train", "test"):
        prompts = len(harmful_prompts(split))
        counts[f"pku_saferlhf/{split}"] = prompts
        counts[f"beavertails/{split}"] = 2 * prompts
        counts[f"beavertails_unsafe/{split}"] = prompts
        counts[f"benign_instructions/{split}"] = sum(len(pool) for pool in benign_pools(split))
    counts["harmful_eval_prompts"] = len(harmful_prompts("test"))
    return counts

