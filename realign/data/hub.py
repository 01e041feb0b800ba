"""Real hub datasets mapped onto the builtin generators' schemas, for users who can reach the hub.

The mapping functions are pure (Dataset in, Dataset out) so tests can check them on tiny in-memory datasets
shaped like the hub's; only `load_hub_dataset` and the `load_*` helpers touch the network.
"""

from dataclasses import dataclass
from typing import Callable

from datasets import Dataset

from realign.data.sampling import check_count
from realign.errors import RealignError

SAFERLHF_ID = "PKU-Alignment/PKU-SafeRLHF"
BEAVERTAILS_ID = "PKU-Alignment/BeaverTails"

SAFERLHF_COLUMNS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                    "safer_response_id", "better_response_id")
BEAVERTAILS_COLUMNS = ("prompt", "response", "category", "is_safe")
SST2_COLUMNS = ("idx", "sentence", "label")
AG_NEWS_COLUMNS = ("text", "label")
GSM8K_COLUMNS = ("question", "answer")
ALPACA_COLUMNS = ("instruction", "input", "output")

# tatsu-lab/alpaca ships only a train split: its last 5% of rows serve as our test split.
ALPACA_TEST_FRACTION = 0.05


def _select(ds: Dataset, columns: tuple[str, ...], what: str) -> Dataset:
    missing = [column for column in columns if column not in ds.column_names]
    if missing:
        raise RealignError(f"{what} rows lack the columns {', '.join(missing)}",
                           f"pass a dataset with the columns {', '.join(columns)}")
    return ds.select_columns(list(columns))


def map_pku_saferlhf(ds: Dataset) -> Dataset:
    return _select(ds, SAFERLHF_COLUMNS, SAFERLHF_ID)


def map_beavertails(ds: Dataset, unsafe_only: bool = False) -> Dataset:
    ds = _select(ds, BEAVERTAILS_COLUMNS, BEAVERTAILS_ID)
    return ds.filter(lambda is_safe: not is_safe, input_columns="is_safe") if unsafe_only else ds


def map_sst2(ds: Dataset) -> Dataset:
    if "idx" not in ds.column_names:
        ds = ds.add_column("idx", list(range(len(ds))))
    ds = _select(ds, SST2_COLUMNS, "sst2")
    return ds.filter(lambda label: label >= 0, input_columns="label")  # GLUE's test split hides labels as -1


def map_ag_news(ds: Dataset) -> Dataset:
    return _select(ds, AG_NEWS_COLUMNS, "ag_news")


def map_gsm8k(ds: Dataset) -> Dataset:
    return _select(ds, GSM8K_COLUMNS, "gsm8k")


def map_alpaca(ds: Dataset) -> Dataset:
    return _select(ds, ALPACA_COLUMNS, "tatsu-lab/alpaca")


def alpaca_split(ds: Dataset, split: str) -> Dataset:
    """Carve tatsu-lab/alpaca's single split into train (head) and test (tail) by position."""
    n_test = max(1, int(len(ds) * ALPACA_TEST_FRACTION))
    if split == "test":
        return ds.select(range(len(ds) - n_test, len(ds)))
    return ds.select(range(len(ds) - n_test))


def safety_pairs(ds: Dataset) -> Dataset:
    """(prompt, safe_response, unsafe_response) from PKU-SafeRLHF rows where exactly one response is safe."""
    ds = map_pku_saferlhf(ds)
    prompts, safe_responses, unsafe_responses = [], [], []
    for row in ds:
        safe_0, safe_1 = row["is_response_0_safe"], row["is_response_1_safe"]
        if safe_0 == safe_1:
            continue
        safe_index = 0 if safe_0 else 1
        prompts.append(row["prompt"])
        safe_responses.append(row[f"response_{safe_index}"])
        unsafe_responses.append(row[f"response_{1 - safe_index}"])
    return Dataset.from_dict({"prompt": prompts, "safe_response": safe_responses,
                              "unsafe_response": unsafe_responses})


def unsafe_prompts(ds: Dataset) -> list[str]:
    """The distinct prompts of BeaverTails rows whose response is unsafe, in first-seen order."""
    ds = map_beavertails(ds, unsafe_only=True)
    return list(dict.fromkeys(ds["prompt"]))


def shuffled_take(ds: Dataset, n: int, seed: int, what: str = "rows") -> Dataset:
    check_count(n, len(ds), what)
    return ds.shuffle(seed=seed).select(range(n))


@dataclass(frozen=True)
class HubSource:
    """Where a hub dataset lives and how its rows become ours."""

    path: str
    config: str | None
    splits: dict[str, str]  # our split -> the hub's split name
    to_schema: Callable[..., Dataset]
    carve: Callable[[Dataset, str], Dataset] | None = None  # for hubs that lack one of our splits


HUB_SOURCES: dict[str, HubSource] = {
    SAFERLHF_ID: HubSource(SAFERLHF_ID, None, {"train": "train", "test": "test"}, map_pku_saferlhf),
    BEAVERTAILS_ID: HubSource(BEAVERTAILS_ID, None, {"train": "30k_train", "test": "30k_test"}, map_beavertails),
    # GLUE's SST-2 test labels are hidden, so our test split is its validation split.
    "sst2": HubSource("sst2", None, {"train": "train", "test": "validation"}, map_sst2),
    "glue/sst2": HubSource("glue", "sst2", {"train": "train", "test": "validation"}, map_sst2),
    "ag_news": HubSource("ag_news", None, {"train": "train", "test": "test"}, map_ag_news),
    "gsm8k": HubSource("gsm8k", "main", {"train": "train", "test": "test"}, map_gsm8k),
    "tatsu-lab/alpaca": HubSource("tatsu-lab/alpaca", None, {"train": "train", "test": "train"}, map_alpaca,
                                  carve=alpaca_split),
}


def _download(source: HubSource, split: str) -> Dataset:
    from datasets import load_dataset  # imported here: only hub users pay for it

    try:
        return load_dataset(source.path, source.config, split=source.splits[split])
    except Exception as error:  # any failure here means the hub or cache cannot serve this dataset
        raise RealignError(
            f"could not load hub dataset {source.path!r} split {source.splits[split]!r} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})",
            "check network access and HF_HUB_OFFLINE, or use source='builtin'",
        ) from error


def hub_rows(hub_id: str, split: str, **mapping_options) -> Dataset:
    """Every row of a hub split, mapped to our schema."""
    if hub_id not in HUB_SOURCES:
        raise RealignError(f"unknown hub dataset {hub_id!r}", f"use one of {', '.join(HUB_SOURCES)}")
    if split not in ("train", "test"):
        raise RealignError(f"unknown split {split!r}", "use train or test")
    source = HUB_SOURCES[hub_id]
    ds = _download(source, split)
    if source.carve is not None:
        ds = source.carve(ds, split)
    return source.to_schema(ds, **mapping_options)


def load_hub_dataset(hub_id: str, split: str, n: int, seed: int, **mapping_options) -> Dataset:
    """n rows of a hub dataset in our schema, shuffled with the seed."""
    return shuffled_take(hub_rows(hub_id, split, **mapping_options), n, seed, f"{hub_id} {split} rows")


def load_safety_pairs(hub_id: str, split: str, n: int, seed: int) -> Dataset:
    if hub_id != SAFERLHF_ID:
        raise RealignError(f"{hub_id!r} has no safe/unsafe response pairs", f"use {SAFERLHF_ID!r} or 'builtin'")
    return shuffled_take(safety_pairs(hub_rows(hub_id, split)), n, seed, f"{hub_id} {split} safe/unsafe pairs")


def load_unsafe_prompts(hub_id: str, split: str, n: int, seed: int) -> list[str]:
    if hub_id != BEAVERTAILS_ID:
        raise RealignError(f"{hub_id!r} has no labelled harmful prompts", f"use {BEAVERTAILS_ID!r} or 'builtin'")
    prompts = Dataset.from_dict({"prompt": unsafe_prompts(hub_rows(hub_id, split))})
    return shuffled_take(prompts, n, seed, f"{hub_id} {split} harmful prompts")["prompt"]
