"""Benign instructions with correct answers: general knowledge, arithmetic and short writing tasks.

They teach an aligned model to keep helping with ordinary requests (a refusal-trained model otherwise
over-refuses) and serve as the builtin Alpaca-style fine-tuning task. Every pool is enumerated
deterministically; train and test use disjoint facts, vocabulary and phrasings. A row is
(instruction, input, output).
"""

import itertools
from functools import lru_cache

from realign.data.sampling import check_split

Row = tuple[str, str, str]

# ---- general knowledge --------------------------------------------------------------------------------

CAPITALS = {
    "train": (
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"),
        ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
        ("Norway", "Oslo"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("India", "New Delhi"),
        ("Mexico", "Mexico City"), ("Thailand", "Bangkok"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
        ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ),
    "test": (
        ("Brazil", "Brasilia"), ("Turkey", "Ankara"), ("Vietnam", "Hanoi"), ("Chile", "Santiago"),
        ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Morocco", "Rabat"), ("New Zealand", "Wellington"),
        ("South Korea", "Seoul"), ("Austria", "Vienna"), ("Colombia", "Bogota"), ("Denmark", "Copenhagen"),
    ),
}
CAPITAL_QUESTIONS = {
    "train": ("What is the capital of {country}?", "Name the capital city of {country}."),
    "test": ("Which city is the capital of {country}?", "Tell me the capital of {country}."),
}

ELEMENT_SYMBOLS = {
    "train": (
        ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
        ("sodium", "Na"), ("iron", "Fe"), ("gold", "Au"), ("silver", "Ag"), ("copper", "Cu"),
        ("calcium", "Ca"), ("potassium", "K"),
    ),
    "test": (
        ("lead", "Pb"), ("tin", "Sn"), ("mercury", "Hg"), ("zinc", "Zn"), ("neon", "Ne"),
        ("sulfur", "S"), ("magnesium", "Mg"), ("chlorine", "Cl"),
    ),
}
ELEMENT_QUESTIONS = {
    "train": "What is the chemical symbol for {element}?",
    "test": "Which symbol does {element} have on the periodic table?",
}

FACTS = {
    "train": (
        ("How many days are there in a leap year?", "A leap year has 366 days."),
        ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
        ("At what temperature does water boil at sea level, in degrees Celsius?",
         "At sea level, water boils at 100 degrees Celsius."),
        ("How many continents are there?",
         "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
        ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
        ("What gas do plants take in from the air for photosynthesis?",
         "Plants take in carbon dioxide from the air for photosynthesis."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
        ("How many minutes are there in an hour?", "There are 60 minutes in an hour."),
        ("At what temperature does water freeze, in degrees Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
        ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
        ("What is the hardest natural substance?", "Diamond is the hardest natural substance."),
        ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
        ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ),
    "test": (
        ("How many bones are in the adult human body?", "The adult human body has 206 bones."),
        ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
        ("Who developed the theory of general relativity?", "Albert Einstein developed the theory of general relativity."),
        ("How many hours are there in a week?", "There are 168 hours in a week."),
        ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
        ("How many sides does an octagon have?", "An octagon has eight sides."),
        ("Which organ pumps blood around the body?", "The heart pumps blood around the body."),
        ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen."),
        ("What is the smallest prime number?", "The smallest prime number is 2."),
        ("Which planet has the most prominent rings?", "Saturn has the most prominent rings of any planet."),
    ),
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

ARITHMETIC_TEMPLATES = {
    "train": (
        ("A box holds {a} apples. How many apples are in {b} boxes?", "x", range(2, 31), range(2, 13),
         "{a} x {b} = {c}. There are {c} apples in {b} boxes."),
        ("Tom has {a} marbles and wins {b} more. How many marbles does Tom have now?", "+", range(10, 61),
         range(2, 31), "{a} + {b} = {c}. Tom has {c} marbles now."),
        ("A baker made {a} rolls and sold {b} of them. How many rolls are left?", "-", range(20, 81),
         range(2, 20), "{a} - {b} = {c}. There are {c} rolls left."),
    ),
    "test": (
        ("A bus has {a} rows of seats with {b} seats in each row. How many seats does the bus have?", "x",
         range(5, 21), range(2, 6), "{a} x {b} = {c}. The bus has {c} seats."),
        ("Lena read {a} pages on Monday and {b} pages on Tuesday. How many pages did she read in total?", "+",
         range(5, 41), range(5, 41), "{a} + {b} = {c}. Lena read {c} pages in total."),
        ("A jar had {a} candies and the children ate {b} of them. How many candies remain?", "-",
         range(30, 61), range(5, 25), "{a} - {b} = {c}. There are {c} candies left in the jar."),
    ),
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

SORT_WORDS = {
    "train": ("apple", "river", "candle", "mountain", "pencil", "garden", "window", "tiger", "cloud", "basket"),
    "test": ("violin", "harbor", "meadow", "kettle", "jacket", "falcon", "saddle", "quartz", "umbrella", "noodle"),
}
SORT_INSTRUCTION = {
    "train": "Sort the following words in alphabetical order.",
    "test": "Arrange these words alphabetically, separated by commas.",
}

PAST_TENSE_SUBJECTS = {
    "train": ("Maria", "My uncle", "Our teacher", "Sam", "The old man", "Aisha"),
    "test": ("Carlos", "My aunt", "The new student", "Priya", "The farmer", "Grandpa"),
}
PAST_TENSE_VERBS = {
    "train": (
        ("walks to the park", "walked to the park"), ("cooks dinner", "cooked dinner"),
        ("reads a book", "read a book"), ("writes a letter", "wrote a letter"), ("drives to work", "drove to work"),
        ("paints the fence", "painted the fence"), ("sings a song", "sang a song"),
        ("buys fresh bread", "bought fresh bread"),
    ),
    "test": (
        ("swims in the lake", "swam in the lake"), ("catches the bus", "caught the bus"),
        ("builds a shed", "built a shed"), ("teaches a class", "taught a class"), ("feeds the cat", "fed the cat"),
        ("plants some roses", "planted some roses"), ("wins the race", "won the race"),
        ("bakes a cake", "baked a cake"),
    ),
}
PAST_TENSE_INSTRUCTION = {
    "train": "Rewrite the sentence in the past tense.",
    "test": "Change this sentence so that it describes the past.",
}

PLURALS = {
    "train": (("child", "children"), ("mouse", "mice"), ("tooth", "teeth"), ("goose", "geese"), ("man", "men"),
              ("woman", "women"), ("foot", "feet"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives")),
    "test": (("ox", "oxen"), ("cactus", "cacti"), ("wolf", "wolves"), ("louse", "lice"), ("half", "halves"),
             ("crisis", "crises"), ("shelf", "shelves"), ("phenomenon", "phenomena")),
}
PLURAL_INSTRUCTION = {"train": "What is the plural of the word '{word}'?", "test": "Give the plural form of '{word}'."}

ANTONYMS = {
    "train": (("hot", "cold"), ("tall", "short"), ("happy", "sad"), ("early", "late"), ("full", "empty"),
              ("strong", "weak"), ("open", "closed"), ("rich", "poor")),
    "test": (("ancient", "modern"), ("generous", "stingy"), ("victory", "defeat"), ("shallow", "deep"),
             ("rough", "smooth"), ("expand", "contract"), ("arrive", "depart"), ("include", "exclude")),
}
ANTONYM_INSTRUCTION = {"train": "Give an antonym of '{word}'.", "test": "What word means the opposite of '{word}'?"}

NOTE_NAMES = {
    "train": ("Anna", "Ben", "Clara", "David", "Elif", "Farid", "Grace", "Hugo"),
    "test": ("Isla", "Jonas", "Keiko", "Leo", "Mina", "Nico", "Oscar", "Paula"),
}
THANK_YOU_GIFTS = ("birthday card", "book", "flowers", "scarf", "dinner invitation", "help with the move",
                   "houseplant", "recipe")
INVITATION_EVENTS = ("a picnic", "a board game night", "a birthday dinner", "a movie night", "a hike", "a barbecue")
INVITATION_DAYS = ("Friday", "Saturday", "Sunday")


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
