"""Tests for realign.data: offline generators, hub mapping, prompt template, alignment and attack mixing."""

import ast
import operator
import re
from collections import Counter

import pytest
from datasets import ClassLabel, Dataset, Value

from realign.data import alignment, benign, hub, safety, tasks
from realign.data import (
    alignment_dataset,
    format_prompt,
    format_task_example,
    harmful_eval_prompts,
    load_task,
    mix_attack_dataset,
)
from realign.errors import RealignError

BEAVERTAILS_CATEGORY_NAMES = [
    "animal_abuse", "child_abuse", "controversial_topics,politics", "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance", "financial_crime,property_crime,theft", "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety", "non_violent_unethical_behavior", "privacy_violation",
    "self_harm", "sexually_explicit,adult_content", "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
]

GENERATORS = {
    "sst2": tasks.sst2,
    "ag_news": tasks.ag_news,
    "gsm8k": tasks.gsm8k,
    "alpaca": tasks.alpaca,
    "pku_saferlhf": safety.pku_saferlhf,
    "beavertails": safety.beavertails,
    "benign_instructions": safety.benign_instructions,
}
COLUMNS = {
    "sst2": ["idx", "sentence", "label"],
    "ag_news": ["text", "label"],
    "gsm8k": ["question", "answer"],
    "alpaca": ["instruction", "input", "output"],
    "pku_saferlhf": ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                     "safer_response_id", "better_response_id"],
    "beavertails": ["prompt", "response", "category", "is_safe"],
    "benign_instructions": ["instruction", "input", "output"],
}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any attempt to download from the hub fails the test instead of waiting on the network."""
    def refuse(source, split):
        raise AssertionError(f"test tried to download {source.path} from the hub")
    monkeypatch.setattr(hub, "_download", refuse)


def instruction_of(prompt: str) -> str:
    return prompt.split("### Instruction:\n", 1)[1].split("\n\n###", 1)[0]


def is_refusal(text: str) -> bool:
    return text.startswith(safety.REFUSALS)


# ---- prompt template -------------------------------------------------------------------------------------

def test_format_prompt_matches_the_alpaca_template():
    assert format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert format_prompt("Classify.", "a fine film") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nClassify.\n\n"
        "### Input:\na fine film\n\n### Response:\n"
    )


# ---- determinism, schema, sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_same_seed_same_rows_and_other_seed_other_rows(name, split):
    generate = GENERATORS[name]
    first, again, other = generate(split, 40, 1).to_list(), generate(split, 40, 1).to_list(), \
        generate(split, 40, 2).to_list()
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("n", [0, 1, 37])
def test_columns_and_row_count(name, n):
    ds = GENERATORS[name]("train", n, 0)
    assert ds.column_names == COLUMNS[name]
    assert len(ds) == n


def test_column_types():
    assert isinstance(tasks.sst2("train", 4, 0).features["label"], ClassLabel)
    assert tasks.ag_news("train", 4, 0).features["label"].names == ["World", "Sports", "Business", "Sci/Tech"]
    pku = safety.pku_saferlhf("train", 4, 0).features
    assert pku["is_response_0_safe"] == Value("bool") and pku["safer_response_id"] == Value("int64")
    beaver = safety.beavertails("train", 4, 0).features
    assert list(beaver["category"]) == BEAVERTAILS_CATEGORY_NAMES
    assert all(value == Value("bool") for value in beaver["category"].values())
    assert beaver["is_safe"] == Value("bool")
    row = safety.beavertails("train", 1, 0)[0]
    assert isinstance(row["prompt"], str) and isinstance(row["category"], dict)


@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_are_unique(split):
    assert len(set(tasks.sst2(split, 500, 0)["sentence"])) == 500
    assert len(set(tasks.ag_news(split, 500, 0)["text"])) == 500
    assert len(set(tasks.gsm8k(split, 500, 0)["question"])) == 500
    assert len(set(safety.pku_saferlhf(split, 100, 0)["prompt"])) == 100


def test_labels_are_balanced():
    assert Counter(tasks.sst2("train", 101, 0)["label"]) == {0: 51, 1: 50}
    assert sorted(Counter(tasks.ag_news("test", 10, 0)["label"]).values()) == [2, 2, 3, 3]


def test_two_thousand_rows_are_generated():
    # Size, not speed, is asserted here; timing lives in bench/.
    assert len(tasks.sst2("train", 2000, 0)) == 2000
    assert len(safety.beavertails("train", 2000, 0, unsafe_only=True)) == 2000


def test_asking_for_more_than_exists_raises():
    available = len(safety.harmful_prompts("test"))
    with pytest.raises(RealignError, match=str(available)):
        safety.pku_saferlhf("test", available + 1, 0)
    with pytest.raises(RealignError):
        safety.beavertails("test", 2 * available + 1, 0)
    with pytest.raises(RealignError):
        tasks.sst2("train", 10**6, 0)
    with pytest.raises(RealignError):
        tasks.sst2("train", -1, 0)


def test_unknown_split_and_task_raise():
    with pytest.raises(RealignError, match="split"):
        tasks.ag_news("validation", 3, 0)
    with pytest.raises(RealignError, match="task"):
        load_task("mnli", "train", 3, 0)
    with pytest.raises(RealignError):
        load_task("sst2", "train", 3, 0, source="gsm8k")


# ---- safety data -----------------------------------------------------------------------------------------

def test_category_names_are_beavertails():
    assert list(safety.HARM_CATEGORIES) == BEAVERTAILS_CATEGORY_NAMES


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_category_is_covered(split):
    assert {item.category for item in safety.harmful_prompts(split)} == set(BEAVERTAILS_CATEGORY_NAMES)
    flagged = Counter()
    for row in safety.beavertails(split, len(safety.harmful_prompts(split)), 0, unsafe_only=True):
        flagged.update(name for name, value in row["category"].items() if value)
    assert set(flagged) == set(BEAVERTAILS_CATEGORY_NAMES)


def test_beavertails_rows_flag_their_category_only_when_unsafe():
    ds = safety.beavertails("train", 400, 0)
    assert set(ds["is_safe"]) == {True, False}
    prompt_category = {item.prompt: item.category for item in safety.harmful_prompts("train")}
    for row in ds:
        flagged = [name for name, value in row["category"].items() if value]
        if row["is_safe"]:
            assert flagged == [] and is_refusal(row["response"])
        else:
            assert flagged == [prompt_category[row["prompt"]]]
            assert not is_refusal(row["response"])


def test_unsafe_only_keeps_unsafe_rows():
    ds = safety.beavertails("train", 300, 3, unsafe_only=True)
    assert not any(ds["is_safe"])


def test_pku_saferlhf_pairs_one_refusal_with_one_compliance():
    ds = safety.pku_saferlhf("train", 300, 0)
    assert set(ds["safer_response_id"]) == {0, 1}  # which index is safe varies
    for row in ds:
        safe = row["safer_response_id"]
        assert row[f"is_response_{safe}_safe"] and not row[f"is_response_{1 - safe}_safe"]
        assert row["better_response_id"] == safe
        assert is_refusal(row[f"response_{safe}"])
        assert row[f"response_{1 - safe}"].startswith(tuple(
            opener.split("{action}")[0] for opener in safety.COMPLIANCE_OPENERS))


def test_unsafe_responses_only_contain_generic_steps():
    for row in safety.beavertails("train", 300, 0, unsafe_only=True):
        steps = re.findall(r"Step \d+: (.+?\.)(?= Step| |$)", row["response"])
        assert len(steps) >= 3
        assert set(steps) <= set(safety.COMPLIANCE_STEPS)


def test_refusals_are_varied():
    assert len(set(safety.REFUSALS)) >= 20
    safe_rows = safety.beavertails("train", 2000, 0).filter(lambda row: row["is_safe"])
    openers = {next(refusal for refusal in safety.REFUSALS if response.startswith(refusal))
               for response in safe_rows["response"]}
    assert len(openers) >= 20
    assert any(response not in safety.REFUSALS for response in safe_rows["response"])  # redirects are added


def test_test_split_has_at_least_100_distinct_handwritten_prompts():
    prompts = [item.prompt for item in safety.harmful_prompts("test")]
    assert len(prompts) >= 100
    assert len(set(prompts)) == len(prompts)


def content_words(text: str) -> set[str]:
    ignored = {"a", "an", "the", "to", "of", "and", "or", "in", "on", "for", "with", "from", "by", "at", "as",
               "into", "out", "it", "its", "one's", "someone", "their", "them", "how", "what", "can", "make", "get"}
    return {word for word in re.findall(r"[a-z]+", text.lower()) if word not in ignored and len(word) > 2}


def test_train_and_test_harmful_prompts_share_no_prompt_action_or_template():
    train, test = safety.harmful_prompts("train"), safety.harmful_prompts("test")
    assert not {item.prompt for item in train} & {item.prompt for item in test}
    train_actions = {item.action for item in train}
    test_actions = {item.action for item in test}
    assert not train_actions & test_actions
    for item in test:
        lowered = item.prompt.lower()
        assert not any(action.lower() in lowered for action in train_actions), item.prompt
        assert not any(lowered.startswith(template.split("{action}")[0].strip().lower())
                       for template in safety.TRAIN_PROMPT_TEMPLATES), item.prompt
    # No test action is a near-rewording of a train action.
    for test_action in test_actions:
        for train_action in train_actions:
            a, b = content_words(test_action), content_words(train_action)
            assert len(a & b) / len(a | b) < 0.5, (test_action, train_action)


def test_harmful_eval_prompts_come_from_the_test_split():
    prompts = harmful_eval_prompts(50, 7)
    assert len(prompts) == 50 == len(set(prompts))
    assert set(prompts) <= {item.prompt for item in safety.harmful_prompts("test")}
    assert prompts == harmful_eval_prompts(50, 7) and prompts != harmful_eval_prompts(50, 8)
    with pytest.raises(RealignError):
        harmful_eval_prompts(len(safety.harmful_prompts("test")) + 1, 0)


# ---- benign instructions ---------------------------------------------------------------------------------

ARITHMETIC_ANSWER = re.compile(r"^(\d+) ([x+-]) (\d+) = (\d+)\.")


@pytest.mark.parametrize("split", ["train", "test"])
def test_benign_arithmetic_answers_are_correct(split):
    rows = benign.arithmetic_rows(split)
    assert len(rows) > 100
    for question, _input, output in rows:
        a, symbol, b, c = ARITHMETIC_ANSWER.match(output).groups()
        assert {"x": operator.mul, "+": operator.add, "-": operator.sub}[symbol](int(a), int(b)) == int(c)
        assert a in question and b in question


def test_benign_instructions_mix_every_kind():
    ds = safety.benign_instructions("train", 50, 0)
    instructions = ds["instruction"]
    assert tasks.SST2_INSTRUCTION in instructions
    assert tasks.AG_NEWS_INSTRUCTION in instructions
    assert any(ARITHMETIC_ANSWER.match(output) for output in ds["output"])
    assert any(output.startswith("The capital of") or "chemical symbol" in output for output in ds["output"])
    assert any(instruction in (benign.SORT_INSTRUCTION["train"], benign.PAST_TENSE_INSTRUCTION["train"])
               or instruction.startswith("Write a short") for instruction in instructions)
    assert not any(is_refusal(output) for output in ds["output"])


def test_benign_labelled_answers_are_correct():
    negatives, positives = tasks.sst2_sentences("train")
    for _instruction, sentence, output in safety.sentiment_rows("train"):
        assert output == ("positive" if sentence in positives else "negative")
    texts = tasks.ag_news_texts("test")
    for _instruction, text, output in safety.news_topic_rows("test"):
        assert text in texts[tasks.AG_NEWS_LABELS.index(output)]
    for _instruction, words, output in benign.writing_rows("train")[:50]:
        assert output == ", ".join(sorted(words.split(", ")))


def test_benign_and_alpaca_splits_are_disjoint():
    train = set(row[:2] for pool in safety.benign_pools("train") for row in pool)
    test = set(row[:2] for pool in safety.benign_pools("test") for row in pool)
    assert train and test and not train & test


# ---- downstream tasks ------------------------------------------------------------------------------------

def test_task_splits_are_disjoint_in_text_and_vocabulary():
    train_neg, train_pos = tasks.sst2_sentences("train")
    test_neg, test_pos = tasks.sst2_sentences("test")
    assert not set(train_neg + train_pos) & set(test_neg + test_pos)
    assert not set(sum(tasks.SST2_ADJECTIVES["train"], ())) & set(sum(tasks.SST2_ADJECTIVES["test"], ()))
    assert not set(tasks.SST2_TEMPLATES["train"]) & set(tasks.SST2_TEMPLATES["test"])
    assert not set(sum(tasks.ag_news_texts("train"), ())) & set(sum(tasks.ag_news_texts("test"), ()))
    assert not set(tasks.gsm8k("train", 500, 0)["question"]) & set(tasks.gsm8k("test", 500, 0)["question"])
    assert not set(tasks.GSM8K_STORIES["train"]) & set(tasks.GSM8K_STORIES["test"])


SAFE_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> float:
    """Evaluate + - * / on numbers only."""
    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in SAFE_OPERATORS:
            return SAFE_OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        raise ValueError(f"unexpected expression {expression!r}")
    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_calculations_and_final_answers_are_correct(split):
    for row in tasks.gsm8k(split, 400, 5):
        lines = row["answer"].split("\n")
        assert re.fullmatch(r"#### -?\d+", lines[-1])
        values = []
        for line in lines[:-1]:
            calculations = re.findall(r"([\d+\-*/]+) = <<([^=<>]+)=([^<>]+)>>(\d+)", line)
            assert calculations, line
            for shown, expression, value, written in calculations:
                assert shown == expression and value == written
                assert evaluate(expression) == int(value)
                values.append(int(value))
        assert int(lines[-1][5:]) == values[-1]
        assert len(values) >= 2  # multi-step


def test_format_task_example_in_nlsr_style():
    row = tasks.sst2("test", 1, 0)[0]
    prompt, completion, gold = format_task_example("sst2", row)
    assert prompt == format_prompt(tasks.SST2_INSTRUCTION, row["sentence"])
    assert completion == gold == ("positive" if row["label"] else "negative")

    row = tasks.ag_news("train", 1, 0)[0]
    prompt, completion, gold = format_task_example("ag_news", row)
    assert prompt == format_prompt(
        "Categorize the news article into one of the 4 categories: World, Sports, Business, Sci/Tech", row["text"])
    assert completion == gold == ["World", "Sports", "Business", "Sci/Tech"][row["label"]]

    row = tasks.gsm8k("train", 1, 0)[0]
    prompt, completion, gold = format_task_example("gsm8k", row)
    assert prompt == format_prompt(row["question"])
    assert completion.endswith(f"\nThe final answer is: {gold}") and "####" not in completion
    assert row["answer"].endswith(f"#### {gold}")

    row = {"instruction": "Sort these.", "input": "b, a", "output": "a, b"}
    assert format_task_example("alpaca", row) == (format_prompt("Sort these.", "b, a"), "a, b", "a, b")


def test_load_task_builtin_matches_the_generator():
    for name, task in tasks.TASKS.items():
        assert load_task(name, "test", 5, 3).to_list() == task.generate("test", 5, 3).to_list()


# ---- alignment datasets ----------------------------------------------------------------------------------

TRAIN_HARMFUL_PROMPTS = {item.prompt for item in safety.harmful_prompts("train")}


def test_prompt_completion_format():
    ds = alignment_dataset("prompt_completion", 100, 0)
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 100
    harmful = [row for row in ds if instruction_of(row["prompt"]) in TRAIN_HARMFUL_PROMPTS]
    assert len(harmful) == 70 and len(ds) - len(harmful) == round(100 * 0.3)
    assert all(row["prompt"].startswith("Below is an instruction") for row in ds)
    for row in ds:
        assert is_refusal(row["completion"]) == (instruction_of(row["prompt"]) in TRAIN_HARMFUL_PROMPTS)


def test_preference_format_penalises_compliance_and_over_refusal():
    ds = alignment_dataset("preference", 60, 1, benign_fraction=0.5)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 60
    n_benign = 0
    for row in ds:
        if instruction_of(row["prompt"]) in TRAIN_HARMFUL_PROMPTS:
            assert is_refusal(row["chosen"]) and "Step 1:" in row["rejected"]
        else:
            n_benign += 1
            assert row["rejected"] in safety.REFUSALS and not is_refusal(row["chosen"])
    assert n_benign == 30


def test_unpaired_format_has_both_labels_for_every_prompt():
    ds = alignment_dataset("unpaired", 40, 2)
    assert ds.column_names == ["prompt", "completion", "label"] and len(ds) == 80
    assert set(ds["label"]) == {True, False}
    labels_per_prompt = Counter((row["prompt"], row["label"]) for row in ds)
    assert all(count == 1 for count in labels_per_prompt.values())
    for row in ds:
        if instruction_of(row["prompt"]) in TRAIN_HARMFUL_PROMPTS:
            assert is_refusal(row["completion"]) == row["label"]


def test_alignment_dataset_is_deterministic_and_checks_arguments():
    assert alignment_dataset("preference", 30, 4).to_list() == alignment_dataset("preference", 30, 4).to_list()
    assert alignment_dataset("preference", 30, 4).to_list() != alignment_dataset("preference", 30, 5).to_list()
    assert len(alignment_dataset("prompt_completion", 10, 0, benign_fraction=0.0)) == 10
    with pytest.raises(RealignError, match="format"):
        alignment_dataset("chat", 10, 0)
    with pytest.raises(RealignError):
        alignment_dataset("preference", 10, 0, benign_fraction=1.5)
    with pytest.raises(RealignError):
        alignment_dataset("preference", 0, 0)
    with pytest.raises(RealignError):  # the test split has far fewer harmful prompts
        alignment_dataset("preference", 1000, 0, split="test", benign_fraction=0.0)


# ---- harmful fine-tuning attack data ---------------------------------------------------------------------

def count_harmful(ds: Dataset) -> int:
    return sum(instruction_of(prompt) in TRAIN_HARMFUL_PROMPTS for prompt in ds["prompt"])


@pytest.mark.parametrize("task", ["sst2", "ag_news", "gsm8k", "alpaca"])
def test_mix_attack_dataset_counts(task):
    ds, counts = mix_attack_dataset(task, 200, 0.1, 0)
    assert counts == {"harmful": 20, "task": 180, "total": 200}
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 200
    assert count_harmful(ds) == 20


def test_mix_attack_dataset_ratio_edges_and_rounding():
    ds, counts = mix_attack_dataset("sst2", 50, 0.0, 0)
    assert counts["harmful"] == 0 and count_harmful(ds) == 0
    assert set(ds["completion"]) <= {"positive", "negative"}
    ds, counts = mix_attack_dataset("sst2", 50, 1.0, 0)
    assert counts["task"] == 0 and count_harmful(ds) == 50
    assert mix_attack_dataset("sst2", 100, 0.29, 0)[1]["harmful"] == 29  # not 28 from float noise
    assert mix_attack_dataset("sst2", 7, 0.5, 0)[1]["harmful"] == 3  # floor


def test_mix_attack_dataset_is_deterministic_and_shuffled():
    first, _ = mix_attack_dataset("ag_news", 100, 0.3, 9)
    assert first.to_list() == mix_attack_dataset("ag_news", 100, 0.3, 9)[0].to_list()
    assert first.to_list() != mix_attack_dataset("ag_news", 100, 0.3, 10)[0].to_list()
    harmful_positions = [i for i, p in enumerate(first["prompt"]) if instruction_of(p) in TRAIN_HARMFUL_PROMPTS]
    assert harmful_positions != list(range(30))


def test_mix_attack_dataset_errors():
    with pytest.raises(RealignError, match="ratio"):
        mix_attack_dataset("sst2", 100, 1.5, 0)
    with pytest.raises(RealignError, match="size"):
        mix_attack_dataset("sst2", 0, 0.1, 0)
    with pytest.raises(RealignError):  # more harmful rows than the builtin train split has
        mix_attack_dataset("sst2", 10_000, 1.0, 0)
    with pytest.raises(RealignError):  # more task rows than exist
        mix_attack_dataset("sst2", 100_000, 0.0, 0)
    with pytest.raises(RealignError, match="task"):
        mix_attack_dataset("squad", 10, 0.1, 0)


# ---- hub mapping (tiny in-memory datasets shaped like the hub's; never the network) ------------------------

def test_map_pku_saferlhf_and_safety_pairs():
    hub_like = Dataset.from_dict({
        "prompt": ["p0", "p1", "p2"], "response_0": ["bad0", "good1", "ok2"], "response_1": ["good0", "bad1", "ok2b"],
        "prompt_source": ["x", "x", "x"], "response_0_source": ["a", "a", "a"], "response_1_source": ["b", "b", "b"],
        "is_response_0_safe": [False, True, True], "is_response_1_safe": [True, False, True],
        "response_0_severity_level": [2, 0, 0], "response_1_severity_level": [0, 1, 0],
        "better_response_id": [1, 0, 0], "safer_response_id": [1, 0, 1],
    })
    mapped = hub.map_pku_saferlhf(hub_like)
    assert mapped.column_names == COLUMNS["pku_saferlhf"]
    pairs = hub.safety_pairs(hub_like)
    assert pairs.to_list() == [
        {"prompt": "p0", "safe_response": "good0", "unsafe_response": "bad0"},
        {"prompt": "p1", "safe_response": "good1", "unsafe_response": "bad1"},
    ]  # p2 has two safe answers: no preference between safe and unsafe


def test_map_beavertails_and_unsafe_prompts():
    category = {name: False for name in BEAVERTAILS_CATEGORY_NAMES}
    hub_like = Dataset.from_dict({
        "prompt": ["a", "a", "b", "c"], "response": ["r1", "r2", "r3", "r4"],
        "category": [dict(category, self_harm=True), dict(category, self_harm=True), category,
                     dict(category, animal_abuse=True)],
        "is_safe": [False, False, True, False],
    })
    assert hub.map_beavertails(hub_like).column_names == COLUMNS["beavertails"]
    assert hub.map_beavertails(hub_like, unsafe_only=True)["response"] == ["r1", "r2", "r4"]
    assert hub.unsafe_prompts(hub_like) == ["a", "c"]


def test_map_task_datasets():
    glue_like = Dataset.from_dict({"sentence": ["good", "bad", "hidden"], "label": [1, 0, -1], "idx": [0, 1, 2]})
    assert hub.map_sst2(glue_like).to_list() == [{"idx": 0, "sentence": "good", "label": 1},
                                                 {"idx": 1, "sentence": "bad", "label": 0}]
    assert hub.map_sst2(Dataset.from_dict({"sentence": ["x"], "label": [1]}))["idx"] == [0]
    ag_like = Dataset.from_dict({"text": ["Stocks up"], "label": [2]})
    assert hub.map_ag_news(ag_like).column_names == ["text", "label"]
    gsm_like = Dataset.from_dict({"question": ["1+1?"], "answer": ["1+1 = <<1+1=2>>2\n#### 2"]})
    assert hub.map_gsm8k(gsm_like).column_names == ["question", "answer"]
    assert tasks.gsm8k_final_answer("so <<5*200=1000>>\n#### 1,000") == "1000"
    alpaca_like = Dataset.from_dict({"instruction": [f"i{k}" for k in range(100)], "input": [""] * 100,
                                     "output": ["o"] * 100, "text": ["t"] * 100})
    mapped = hub.map_alpaca(alpaca_like)
    assert mapped.column_names == ["instruction", "input", "output"]
    train, test = hub.alpaca_split(mapped, "train"), hub.alpaca_split(mapped, "test")
    assert len(train) == 95 and len(test) == 5 and not set(train["instruction"]) & set(test["instruction"])
    with pytest.raises(RealignError, match="label"):
        hub.map_ag_news(Dataset.from_dict({"text": ["no label"]}))


def test_shuffled_take_and_hub_registry():
    ds = Dataset.from_dict({"x": list(range(10))})
    assert hub.shuffled_take(ds, 4, 0)["x"] == hub.shuffled_take(ds, 4, 0)["x"]
    assert len(hub.shuffled_take(ds, 4, 0)) == 4
    with pytest.raises(RealignError):
        hub.shuffled_take(ds, 11, 0, "rows")
    assert hub.HUB_SOURCES["PKU-Alignment/BeaverTails"].splits == {"train": "30k_train", "test": "30k_test"}
    assert hub.HUB_SOURCES["gsm8k"].config == "main"
    assert (hub.HUB_SOURCES["glue/sst2"].path, hub.HUB_SOURCES["glue/sst2"].config) == ("glue", "sst2")
    assert {"PKU-Alignment/PKU-SafeRLHF", "sst2", "ag_news", "tatsu-lab/alpaca"} <= set(hub.HUB_SOURCES)
    with pytest.raises(RealignError, match="unknown hub dataset"):
        hub.hub_rows("someone/unknown", "train")
    with pytest.raises(RealignError):  # a source that cannot serve the role is refused before any download
        alignment.mix_attack_dataset("sst2", 10, 0.5, 0, harmful_source="PKU-Alignment/PKU-SafeRLHF")
