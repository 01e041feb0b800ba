"""The stages: each module declares its `Stage` (realign.stages.base) and registers it; `stage_table()` is the
one table of stages that the CLI, the pipeline and the MLproject entries are made from."""

from __future__ import annotations

import importlib

# Modules that declare a stage, in the order of the chain (the CLI lists them so).
STAGE_MODULES = ("align", "attack", "evaluate", "expo", "score", "fuse", "compare")


def stage_table():
    """The registry of every stage (realign.stages.base.STAGES), each stage module imported once."""
    from realign.stages.base import STAGES

    for name in STAGE_MODULES:
        importlib.import_module(f"realign.stages.{name}")
    return STAGES
