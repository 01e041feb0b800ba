"""Small helpers every generator shares: split and count checks, seeded sampling, balanced picks."""

import random
from typing import Sequence, TypeVar

from realign.errors import RealignError

SPLITS = ("train", "test")

T = TypeVar("T")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise RealignError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def check_count(n: int, available: int, what: str) -> None:
    """Refuse to silently return fewer rows than asked for."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RealignError(f"the number of {what} must be a non-negative integer, got {n!r}", "pass n >= 0")
    if n > available:
        raise RealignError(
            f"asked for {n} {what} but only {available} unique ones exist",
            f"lower n to at most {available} or use a hub dataset as the source",
        )


def sample(pool: Sequence[T], n: int, rng: random.Random, what: str) -> list[T]:
    """n distinct items of pool in a seeded random order."""
    check_count(n, len(pool), what)
    return rng.sample(list(pool), n)


def balanced_sample(pools: Sequence[Sequence[T]], n: int, rng: random.Random, what: str) -> list[T]:
    """n items spread as evenly as possible over pools (one pool per class), then shuffled.

    The first n % len(pools) pools give one extra item, so labels never differ by more than one.
    """
    check_count(n, sum(len(pool) for pool in pools), what)
    shares = [n // len(pools) + (1 if index < n % len(pools) else 0) for index in range(len(pools))]
    picked: list[T] = []
    for pool, share in zip(pools, shares):
        if share > len(pool):
            raise RealignError(
                f"asked for {n} balanced {what} but one class has only {len(pool)} unique examples",
                f"lower n to at most {len(pools) * min(len(p) for p in pools)}",
            )
        picked.extend(rng.sample(list(pool), share))
    rng.shuffle(picked)
    return picked


def round_robin_sample(pools: Sequence[Sequence[T]], n: int, rng: random.Random, what: str) -> list[T]:
    """n items taken in turn from each shuffled pool, so small pools are not drowned by big ones; then shuffled."""
    check_count(n, sum(len(pool) for pool in pools), what)
    queues = [rng.sample(list(pool), len(pool)) for pool in pools]
    picked: list[T] = []
    position = 0
    while len(picked) < n:
        for queue in queues:
            if position < len(queue) and len(picked) < n:
                picked.append(queue[position])
        position += 1
    rng.shuffle(picked)
    return picked
