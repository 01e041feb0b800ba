"""The builtin generators' text as package data: sentences, prompts, refusals and answers, one YAML file per topic.

safety.yaml (realign.data.safety), tasks.yaml (realign.data.tasks), benign.yaml (realign.data.benign) and
synthetic_pairs.yaml (realign.eval.synthetic_pairs) are read once, at import, by the modules that own them;
judge_requests.jsonl (realign.data.safety.judge_training_prompts) lies here too. The files sit in this package
directory, so an installed wheel reads them from the same place as a source checkout.
"""

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from realign.errors import RealignError

# libyaml's safe loader when PyYAML has it (ten times faster at import), else the pure-Python one: both are
# yaml.safe_load's SafeLoader rules, and tests/test_builtin_data.py checks that they read these files alike.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_text(name: str) -> str:
    """The text of one data file of this package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    """The top-level mapping of one YAML data file, parsed once (shared: section() hands out tuple copies)."""
    data = yaml.load(read_text(name), Loader=SAFE_LOADER)
    if not isinstance(data, dict):
        raise RealignError(f"builtin data file {name} holds no mapping", "restore it from the realign package")
    return data


def as_tuples(value: Any) -> Any:
    """value with every list turned into a tuple, recursively (also inside mappings, whose keys are kept)."""
    if isinstance(value, list):
        return tuple(as_tuples(item) for item in value)
    if isinstance(value, dict):
        return {key: as_tuples(item) for key, item in value.items()}
    return value


def section(name: str, key: str) -> Any:
    """One top-level entry of a data file, lists as tuples."""
    data = load(name)
    if key not in data:
        raise RealignError(f"builtin data file {name} has no entry {key!r}", "restore it from the realign package")
    return as_tuples(data[key])
