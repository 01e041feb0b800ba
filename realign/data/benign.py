"""Benign instructions with correct answers: general knowledge, arithmetic and short writing tasks.

They teach an aligned model to keep helping with ordinary requests (a refusal-trained model otherwise
over-refuses) and serve as the builtin Alpaca-style fine-tuning task. Every pool is enumerated
deterministically; train and test use disjoint facts, vocabulary and phrasings. A row is
(instruction, input, output).
"""

import itertools
from functools import lru_cache

from realign.data import builtin
from realign.data.sampling import check_split

Row = tuple[str, str, str]

# The facts, words and phrasings live in realign/data/builtin/benign.yaml (see its comments); these are their
# Python shapes.
_DATA = "benign.yaml"

# ---- general knowledge --------------------------------------------------------------------------------

CAPITALS: dict[str, tuple[tuple[str, str], ...]] = builtin.section(_DATA, "capitals")
CAPITAL_QUESTIONS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "capital_questions")

ELEMENT_SYMBOLS: dict[str, tuple[tuple[str, str], ...]] = builtin.section(_DATA, "element_symbols")
ELEMENT_QUESTIONS: dict[str, str] = builtin.section(_DATA, "element_questions")

FACTS: dict[str, tuple[tuple[str, str], ...]] = {  # (question, answer) per split
    split: tuple((fact["question"], fact["answer"]) for fact in facts)
    for split, facts in builtin.section(_DATA, "facts").items()
}


@lru_cache(maxsize=None)
def knowledge_rows(split: str) -> tuple[Row, ...]:
    check_split(split)
    rows: list[Row] = []
    for question in CAPITAL_QUESTIONS[split]:
        for country, capital in CAPITALS[split]:
            rows.append((question.format(country=country), "", f"The capital of {country} is {capital}."))
    for element, symbol in ELEMENT_SYMBOLS[split]:
        rows.append((ELEMENT_QUESTIONS[split].format(element=element), "",
                     f"The chemical symbol for {element} is {symbol}."))
    for question, answer in FACTS[split]:
        rows.append((question, "", answer))
    return tuple(rows)


# ---- arithmetic word problems --------------------------------------------------------------------------
# Each template: (question, operator, range of a, range of b, answer sentence). The answer shows the
# calculation "a op b = c" so tests (and readers) can check it.

ARITHMETIC_TEMPLATES: dict[str, tuple[tuple[str, str, range, range, str], ...]] = {
    split: tuple((template["question"], template["operator"], range(*template["a"]), range(*template["b"]),
                  template["answer"]) for template in templates)
    for split, templates in builtin.section(_DATA, "arithmetic_templates").items()
}
ARITHMETIC_OPERATIONS = {"x": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}


@lru_cache(maxsize=None)
def arithmetic_rows(split: str) -> tuple[Row, ...]:
    check_split(split)
    rows: list[Row] = []
    for question, operator, a_values, b_values, answer in ARITHMETIC_TEMPLATES[split]:
        for a, b in itertools.product(a_values, b_values):
            c = ARITHMETIC_OPERATIONS[operator](a, b)
            rows.append((question.format(a=a, b=b), "", answer.format(a=a, b=b, c=c)))
    return tuple(rows)


# ---- short writing and rewriting tasks ----------------------------------------------------------------

SORT_WORDS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "sort_words")
SORT_INSTRUCTION: dict[str, str] = builtin.section(_DATA, "sort_instruction")

PAST_TENSE_SUBJECTS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "past_tense_subjects")
PAST_TENSE_VERBS: dict[str, tuple[tuple[str, str], ...]] = builtin.section(_DATA, "past_tense_verbs")
PAST_TENSE_INSTRUCTION: dict[str, str] = builtin.section(_DATA, "past_tense_instruction")

PLURALS: dict[str, tuple[tuple[str, str], ...]] = builtin.section(_DATA, "plurals")
PLURAL_INSTRUCTION: dict[str, str] = builtin.section(_DATA, "plural_instruction")

ANTONYMS: dict[str, tuple[tuple[str, str], ...]] = builtin.section(_DATA, "antonyms")
ANTONYM_INSTRUCTION: dict[str, str] = builtin.section(_DATA, "antonym_instruction")

NOTE_NAMES: dict[str, tuple[str, ...]] = builtin.section(_DATA, "note_names")
THANK_YOU_GIFTS: tuple[str, ...] = builtin.section(_DATA, "thank_you_gifts")
INVITATION_EVENTS: tuple[str, ...] = builtin.section(_DATA, "invitation_events")
INVITATION_DAYS: tuple[str, ...] = builtin.section(_DATA, "invitation_days")


@lru_cache(maxsize=None)
def writing_rows(split: str) -> tuple[Row, ...]:
    check_split(split)
    rows: list[Row] = []
    for words in itertools.combinations(SORT_WORDS[split], 4):
        rows.append((SORT_INSTRUCTION[split], ", ".join(words), ", ".join(sorted(words))))
    for subject, (present, past) in itertools.product(PAST_TENSE_SUBJECTS[split], PAST_TENSE_VERBS[split]):
        rows.append((PAST_TENSE_INSTRUCTION[split], f"{subject} {present}.", f"{subject} {past}."))
    for word, plural in PLURALS[split]:
        rows.append((PLURAL_INSTRUCTION[split].format(word=word), "", f"The plural of '{word}' is '{plural}'."))
    for word, antonym in ANTONYMS[split]:
        answer = f"An antonym of '{word}' is '{antonym}'." if split == "train" else \
            f"The opposite of '{word}' is '{antonym}'."
        rows.append((ANTONYM_INSTRUCTION[split].format(word=word), "", answer))
    if split == "train":
        for name, gift in itertools.product(NOTE_NAMES[split], THANK_YOU_GIFTS):
            rows.append((f"Write a short thank-you note to {name} for the {gift}.", "",
                         f"Dear {name},\n\nThank you so much for the {gift}. It was very thoughtful of you, "
                         f"and I really appreciate it.\n\nBest wishes"))
    else:
        for name, event, day in itertools.product(NOTE_NAMES[split], INVITATION_EVENTS, INVITATION_DAYS):
            rows.append((f"Write a short message inviting {name} to {event} on {day}.", "",
                         f"Hi {name}, I'd love for you to join me for {event} on {day}. "
                         f"Let me know if you can make it!"))
    return tuple(rows)
