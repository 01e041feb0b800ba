"""Downstream tasks for the harmful fine-tuning attack, with the hub's schemas and the NLSR prompt style.

The builtin generators are deterministic (seeded `random.Random`, never the global RNG). Train and test use
different sentence templates and vocabulary, so no test example is a copy of a training one.
"""

import itertools
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from datasets import ClassLabel, Dataset, Features, Value

from realign.data import benign, builtin, hub
from realign.data.sampling import balanced_sample, check_count, check_split, round_robin_sample
from realign.data.templates import format_prompt
from realign.errors import RealignError

# The sentences and names live in realign/data/builtin/tasks.yaml (see its comments); these are their Python
# shapes. The label words stay here: they are the hub datasets' ClassLabel names.
_DATA = "tasks.yaml"

SST2_INSTRUCTION: str = builtin.section(_DATA, "sst2_instruction")
AG_NEWS_INSTRUCTION: str = builtin.section(_DATA, "ag_news_instruction")
SST2_LABELS = ("negative", "positive")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")

SST2_FEATURES = Features({"idx": Value("int32"), "sentence": Value("string"),
                          "label": ClassLabel(names=list(SST2_LABELS))})
AG_NEWS_FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=list(AG_NEWS_LABELS))})
GSM8K_FEATURES = Features({"question": Value("string"), "answer": Value("string")})
ALPACA_FEATURES = Features({"instruction": Value("string"), "input": Value("string"), "output": Value("string")})

# ---- SST-2: movie-review sentences; the label comes from the adjective, templates are label-neutral -----

SST2_TEMPLATES: dict[str, tuple[str, ...]] = builtin.section(_DATA, "sst2_templates")
SST2_SUBJECTS: dict[str, tuple[str, ...]] = builtin.section(_DATA, "sst2_subjects")
SST2_ADJECTIVES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (negative, positive) per split
    split: (adjectives["negative"], adjectives["positive"])
    for split, adjectives in builtin.section(_DATA, "sst2_adjectives").items()
}


@lru_cache(maxsize=None)
def sst2_sentences(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """All unique sentences of a split, as (negative sentences, positive sentences)."""
    check_split(split)
    by_label = []
    for adjectives in SST2_ADJECTIVES[split]:
        by_label.append(tuple(
            template.format(subject=subject, adjective=adjective)
            for template, subject, adjective in itertools.product(
                SST2_TEMPLATES[split], SST2_SUBJECTS[split], adjectives)
        ))
    return by_label[0], by_label[1]


def sst2(split: str, n: int, seed: int) -> Dataset:
    """Balanced SST-2 rows: idx, sentence, label (0 negative, 1 positive)."""
    negatives, positives = sst2_sentences(split)
    pools = [[(sentence, 0) for sentence in negatives], [(sentence, 1) for sentence in positives]]
    rows = balanced_sample(pools, n, random.Random(seed), f"sst2 {split} sentences")
    return Dataset.from_dict({"idx": list(range(len(rows))), "sentence": [s for s, _ in rows],
                              "label": [label for _, label in rows]}, features=SST2_FEATURES)


# ---- AG News: "Headline (Source) Source - body" like the hub's text; slots filled from per-split pools ---

AG_NEWS_SOURCES: tuple[str, ...] = builtin.section(_DATA, "ag_news_sources")

# Per split, per label: slot pools and (headline, body) templates. A slot ending in "2" draws from the pool
# of the same name without the digit and must differ from the first one ("{team} beat {team2}"); a slot
# ending in "_lc" repeats its base slot in lower case (title-case headline, sentence-case body).
AG_NEWS_CONTENT: dict[str, dict[int, tuple[dict[str, tuple[str, ...]], tuple[tuple[str, str], ...]]]] = {
    split: {label: (content["pools"], tuple((pair["headline"], pair["body"]) for pair in content["templates"]))
            for label, content in by_label.items()}
    for split, by_label in builtin.section(_DATA, "ag_news_content").items()
}

SLOT = re.compile(r"\{(\w+)\}")


def _fill_slots(template_pair: tuple[str, str], pools: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Every (headline, body) the template can make; a slot like {team2} never repeats {team}'s value."""
    slots = sorted({slot.removesuffix("_lc") for slot in SLOT.findall(template_pair[0] + template_pair[1])})
    choices = [pools[slot.rstrip("2")] for slot in slots]
    filled = []
    for values in itertools.product(*choices):
        assignment = dict(zip(slots, values))
        if any(slot.endswith("2") and assignment[slot] == assignment[slot[:-1]] for slot in slots):
            continue
        assignment.update({f"{slot}_lc": value.lower() for slot, value in zip(slots, values)})
        filled.append((template_pair[0].format(**assignment), template_pair[1].format(**assignment)))
    return filled


@lru_cache(maxsize=None)
def ag_news_texts(split: str) -> tuple[tuple[str, ...], ...]:
    """All unique texts of a split, one tuple per label (World, Sports, Business, Sci/Tech)."""
    check_split(split)
    by_label = []
    for label in range(len(AG_NEWS_LABELS)):
        pools, templates = AG_NEWS_CONTENT[split][label]
        texts = []
        for template_pair in templates:
            for headline, body in _fill_slots(template_pair, pools):
                texts.extend(f"{headline} ({source}) {source} - {body}" for source in AG_NEWS_SOURCES)
        by_label.append(tuple(texts))
    return tuple(by_label)


def ag_news(split: str, n: int, seed: int) -> Dataset:
    """Balanced AG News rows: text, label (0 World, 1 Sports, 2 Business, 3 Sci/Tech)."""
    pools = [[(text, label) for text in texts] for label, texts in enumerate(ag_news_texts(split))]
    rows = balanced_sample(pools, n, random.Random(seed), f"ag_news {split} texts")
    return Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]},
                             features=AG_NEWS_FEATURES)


# ---- GSM8K: multi-step word problems with GSM8K's "<<expr=value>>" annotations and "#### answer" -----------

GSM8K_NAMES: dict[str, tuple[str, ...]] = builtin.section(_DATA, "gsm8k_names")
SHOPPING_ITEMS: tuple[str, ...] = builtin.section(_DATA, "shopping_items")


def calc(a: int, operator: str, b: int) -> tuple[str, int]:
    """An exact integer calculation as (expression, value); division must leave no remainder."""
    if operator == "/":
        if a % b:
            raise ValueError(f"{a}/{b} is not a whole number")
        value = a // b
    else:
        value = {"+": a + b, "-": a - b, "*": a * b}[operator]
    return f"{a}{operator}{b}", value


def step(before: str, a: int, operator: str, b: int, after: str) -> tuple[str, int]:
    """One GSM8K answer line, e.g. 'She sold 48/2 = <<48/2=24>>24 clips in May.'"""
    expression, value = calc(a, operator, b)
    return f"{before}{expression} = <<{expression}={value}>>{value}{after}", value


Problem = tuple[str, list[str], int]  # question, answer lines, final answer


def _change(rng: random.Random, name: str) -> Problem:
    packs, price, item = rng.randint(2, 9), rng.randint(2, 11), rng.choice(SHOPPING_ITEMS)
    line1, cost = step(f"The {item} cost ", packs, "*", price, " dollars.")
    bill = 100 if cost >= 50 else 50
    line2, change = step(f"{name} gets ", bill, "-", cost, " dollars in change.")
    question = (f"{name} buys {packs} packs of {item} at ${price} per pack and pays with a ${bill} bill. "
                f"How much change, in dollars, does {name} get back?")
    return question, [line1, line2], change


def _cookies(rng: random.Random, name: str) -> Problem:
    trays, per_tray = rng.randint(2, 8), rng.randint(6, 24)
    line1, total = step(f"{name} bakes ", trays, "*", per_tray, " cookies.")
    given = rng.randint(1, total - 1)
    line2, left = step(f"{name} has ", total, "-", given, " cookies left.")
    question = (f"{name} bakes {trays} trays of cookies with {per_tray} cookies on each tray and gives {given} "
                f"cookies to the neighbours. How many cookies does {name} have left?")
    return question, [line1, line2], left


def _savings(rng: random.Random, name: str) -> Problem:
    weekly, weeks = rng.randint(5, 40), rng.randint(3, 20)
    line1, saved = step(f"{name} saves ", weekly, "*", weeks, " dollars.")
    spent = rng.randint(10, saved - 1)
    line2, left = step(f"{name} has ", saved, "-", spent, " dollars left.")
    question = (f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a new bike. "
                f"How many dollars does {name} have left?")
    return question, [line1, line2], left


def _reading(rng: random.Random, name: str) -> Problem:
    per_day, days, extra = rng.randint(5, 40), rng.randint(2, 14), rng.randint(10, 200)
    pages = per_day * days + extra
    line1, read = step(f"{name} reads ", per_day, "*", days, " pages.")
    line2, left = step("There are ", pages, "-", read, " pages left.")
    question = (f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days. "
                f"How many pages are left to read?")
    return question, [line1, line2], left


def _farm_legs(rng: random.Random, name: str) -> Problem:
    chickens, cows = rng.randint(3, 40), rng.randint(2, 25)
    line1, chicken_legs = step("The chickens have ", chickens, "*", 2, " legs.")
    line2, cow_legs = step("The cows have ", cows, "*", 4, " legs.")
    line3, total = step("Altogether there are ", chicken_legs, "+", cow_legs, " legs.")
    question = (f"{name} has a farm with {chickens} chickens and {cows} cows. "
                f"How many legs do the animals have in total?")
    return question, [line1, line2, line3], total


def _road_trip(rng: random.Random, name: str) -> Problem:
    speed1, hours1, speed2, hours2 = rng.randint(30, 70), rng.randint(2, 6), rng.randint(30, 70), rng.randint(1, 5)
    line1, distance1 = step(f"First {name} drives ", speed1, "*", hours1, " miles.")
    line2, distance2 = step(f"Then {name} drives ", speed2, "*", hours2, " miles.")
    line3, total = step(f"{name} drives ", distance1, "+", distance2, " miles in total.")
    question = (f"{name} drives at {speed1} miles per hour for {hours1} hours, then at {speed2} miles per hour "
                f"for {hours2} more hours. How many miles does {name} drive in total?")
    return question, [line1, line2, line3], total


def _tomato_bags(rng: random.Random, name: str) -> Problem:
    rows, per_row, per_plant = rng.randint(2, 9), rng.randint(3, 12), rng.randint(4, 15)
    line1, plants = step(f"{name} has ", rows, "*", per_row, " tomato plants.")
    line2, tomatoes = step("They grow ", plants, "*", per_plant, " tomatoes.")
    bag = rng.choice([size for size in range(2, 13) if tomatoes % size == 0])
    line3, bags = step(f"{name} fills ", tomatoes, "/", bag, " bags.")
    question = (f"{name} plants {rows} rows of tomatoes with {per_row} plants in each row. Each plant grows "
                f"{per_plant} tomatoes. {name} packs all the tomatoes into bags of {bag}. How many bags does "
                f"{name} fill?")
    return question, [line1, line2, line3], bags


def _walkers(rng: random.Random, name: str) -> Problem:
    students, percent = 20 * rng.randint(1, 20), 5 * rng.randint(1, 19)
    walkers = students * percent // 100  # exact: 20k * 5m / 100 = k*m
    expression = f"{students}*{percent}/100"
    line1 = f"{expression} = <<{expression}={walkers}>>{walkers} students walk to school."
    line2, others = step("So ", students, "-", walkers, " students do not walk.")
    question = (f"{name}'s school has {students} students and {percent}% of them walk to school. "
                f"How many students do not walk to school?")
    return question, [line1, line2], others


def _empty_seats(rng: random.Random, name: str) -> Problem:
    rows, per_row = rng.randint(10, 40), rng.randint(12, 30)
    line1, seats = step("The hall has ", rows, "*", per_row, " seats.")
    sold = rng.randint(1, seats - 1)
    line2, empty = step("There are ", seats, "-", sold, " empty seats.")
    question = (f"A concert hall has {rows} rows with {per_row} seats in each row. {name} sold {sold} tickets, "
                f"one seat per ticket. How many seats stay empty?")
    return question, [line1, line2], empty


def _pizza_slices(rng: random.Random, name: str) -> Problem:
    pizzas, slices = rng.randint(2, 8), rng.choice([6, 8, 10, 12])
    line1, total = step("There are ", pizzas, "*", slices, " slices.")
    kids = rng.choice([count for count in range(2, 13) if total % count == 0])
    line2, each = step("Each child gets ", total, "/", kids, " slices.")
    question = (f"{name} orders {pizzas} pizzas, each cut into {slices} slices, for a party of {kids} children. "
                f"If the slices are shared equally, how many slices does each child get?")
    return question, [line1, line2], each


def _weekly_wage(rng: random.Random, name: str) -> Problem:
    rate, weekday_hours, saturday_hours = rng.randint(8, 25), rng.randint(2, 8), rng.randint(1, 6)
    line1, weekday_total = step(f"On weekdays {name} works ", 5, "*", weekday_hours, " hours.")
    line2, hours = step(f"{name} works ", weekday_total, "+", saturday_hours, " hours in the week.")
    line3, pay = step(f"{name} earns ", hours, "*", rate, " dollars.")
    question = (f"{name} earns ${rate} an hour, works {weekday_hours} hours on each of the 5 weekdays and "
                f"{saturday_hours} hours on Saturday. How many dollars does {name} earn in the week?")
    return question, [line1, line2, line3], pay


def _leaky_tank(rng: random.Random, name: str) -> Problem:
    inflow = rng.randint(5, 20)
    leak, minutes = rng.randint(1, inflow - 1), rng.randint(5, 40)
    litres = (inflow - leak) * minutes
    line1, net = step("The tank gains ", inflow, "-", leak, " litres per minute.")
    line2, answer = step("It takes ", litres, "/", net, " minutes to fill.")
    question = (f"{name} fills a {litres}-litre tank with a hose that adds {inflow} litres per minute, but the tank "
                f"leaks {leak} litres per minute. How many minutes does it take to fill the tank?")
    return question, [line1, line2], answer


def _stickers(rng: random.Random, name: str) -> Problem:
    start, times, classmates = rng.randint(3, 20), rng.randint(2, 5), rng.randint(2, 8)
    line1, gift = step(f"{name} receives ", start, "*", times, " stickers.")
    line2, total = step(f"{name} then has ", start, "+", gift, " stickers.")
    each = rng.randint(1, min(5, total // classmates))  # never give away more than there is
    line3, given = step(f"{name} gives away ", each, "*", classmates, " stickers.")
    line4, left = step(f"{name} keeps ", total, "-", given, " stickers.")
    question = (f"{name} has {start} stickers. A friend gives {name} {times} times as many stickers as {name} "
                f"already has. Then {name} gives {each} stickers to each of {classmates} classmates. How many "
                f"stickers does {name} keep?")
    return question, [line1, line2, line3, line4], left


def _bakery_sales(rng: random.Random, name: str) -> Problem:
    muffins, muffin_price = rng.randint(5, 40), rng.randint(2, 5)
    cakes, cake_price = rng.randint(2, 10), rng.randint(10, 30)
    line1, muffin_money = step("The muffins bring in ", muffins, "*", muffin_price, " dollars.")
    line2, cake_money = step("The cakes bring in ", cakes, "*", cake_price, " dollars.")
    line3, total = step(f"{name} takes in ", muffin_money, "+", cake_money, " dollars.")
    question = (f"{name}'s bakery sells {muffins} muffins at ${muffin_price} each and {cakes} cakes at "
                f"${cake_price} each. How many dollars does the bakery take in?")
    return question, [line1, line2, line3], total


GSM8K_STORIES: dict[str, tuple[Callable[[random.Random, str], Problem], ...]] = {
    "train": (_change, _cookies, _savings, _reading, _farm_legs, _road_trip, _tomato_bags, _walkers),
    "test": (_empty_seats, _pizza_slices, _weekly_wage, _leaky_tank, _stickers, _bakery_sales),
}


def gsm8k(split: str, n: int, seed: int) -> Dataset:
    """GSM8K rows: question, answer (calculation lines, then '#### N'). Arithmetic is exact by construction."""
    check_split(split)
    check_count(n, 10**6, f"gsm8k {split} problems")
    rng = random.Random(seed)
    questions: list[str] = []
    answers: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(questions) < n:
        attempts += 1
        if attempts > 50 * n + 100:  # the number ranges make this unreachable in practice; never loop forever
            raise RealignError(f"could not generate {n} distinct gsm8k {split} problems", "lower n")
        story = rng.choice(GSM8K_STORIES[split])
        question, lines, final = story(rng, rng.choice(GSM8K_NAMES[split]))
        if question in seen:
            continue
        seen.add(question)
        questions.append(question)
        answers.append("\n".join(lines) + f"\n#### {final}")
    return Dataset.from_dict({"question": questions, "answer": answers}, features=GSM8K_FEATURES)


# ---- Alpaca: varied benign instructions with correct outputs ----------------------------------------------

def alpaca(split: str, n: int, seed: int) -> Dataset:
    """Alpaca rows: instruction, input, output, drawn in turn from knowledge, arithmetic and writing tasks."""
    pools = [benign.knowledge_rows(split), benign.arithmetic_rows(split), benign.writing_rows(split)]
    rows = round_robin_sample(pools, n, random.Random(seed), f"alpaca {split} instructions")
    return Dataset.from_dict({"instruction": [r[0] for r in rows], "input": [r[1] for r in rows],
                              "output": [r[2] for r in rows]}, features=ALPACA_FEATURES)


# ---- NLSR-style formatting and the task registry ---------------------------------------------------------

def _format_sst2(row: dict) -> tuple[str, str, str]:
    word = SST2_LABELS[row["label"]]
    return format_prompt(SST2_INSTRUCTION, row["sentence"]), word, word


def _format_ag_news(row: dict) -> tuple[str, str, str]:
    word = AG_NEWS_LABELS[row["label"]]
    return format_prompt(AG_NEWS_INSTRUCTION, row["text"]), word, word


def gsm8k_final_answer(answer: str) -> str:
    """The number after '####' (GSM8K writes thousands with commas now and then)."""
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _format_gsm8k(row: dict) -> tuple[str, str, str]:
    reasoning = row["answer"].rsplit("####", 1)[0].strip()
    gold = gsm8k_final_answer(row["answer"])
    return format_prompt(row["question"]), f"{reasoning}\nThe final answer is: {gold}", gold


def _format_alpaca(row: dict) -> tuple[str, str, str]:
    return format_prompt(row["instruction"], row.get("input") or ""), row["output"], row["output"]


@dataclass(frozen=True)
class Task:
    """A downstream task: builtin generator, accepted hub ids (the first is the default) and its formatter."""

    name: str
    generate: Callable[[str, int, int], Dataset]
    hub_ids: tuple[str, ...]
    format_example: Callable[[dict], tuple[str, str, str]]


TASKS: dict[str, Task] = {
    "sst2": Task("sst2", sst2, ("sst2", "glue/sst2"), _format_sst2),
    "ag_news": Task("ag_news", ag_news, ("ag_news",), _format_ag_news),
    "gsm8k": Task("gsm8k", gsm8k, ("gsm8k",), _format_gsm8k),
    "alpaca": Task("alpaca", alpaca, ("tatsu-lab/alpaca",), _format_alpaca),
}


def get_task(task: str) -> Task:
    if task not in TASKS:
        raise RealignError(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    return TASKS[task]


def format_task_example(task: str, row: dict) -> tuple[str, str, str]:
    """(prompt, completion, gold) for one row of a task, in the NLSR prompt style."""
    return get_task(task).format_example(row)


def load_task(task: str, split: str, n: int, seed: int, source: str = "builtin") -> Dataset:
    """n rows of a task. source: "builtin" (offline generators), "hub" (the task's default hub id) or a hub id."""
    spec = get_task(task)
    if source == "builtin":
        return spec.generate(split, n, seed)
    hub_id = spec.hub_ids[0] if source == "hub" else source
    if hub_id not in spec.hub_ids:
        raise RealignError(f"hub dataset {hub_id!r} does not provide task {task!r}",
                           f"use source='builtin', 'hub' or one of {', '.join(spec.hub_ids)}")
    check_split(split)
    return hub.load_hub_dataset(hub_id, split, n, seed)


def check_task(task: str) -> None:
    """One line for a task name that is not one of TASKS ("" = no task)."""
    from realign.errors import RealignError

    if task and task not in TASKS:
        raise RealignError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
