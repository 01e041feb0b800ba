"""MLflow's GenAI evaluation pieces realign's scorers are made of (realign/scorers.py holds no MLflow import)."""

from __future__ import annotations

from typing import Any, Callable


def genai_scorer(function: Callable[..., Any], name: str, description: str):
    """`function(inputs, outputs)` as an MLflow GenAI scorer, for `mlflow.genai.evaluate(scorers=[...])`."""
    from mlflow.genai.scorers import scorer

    return scorer(function, name=name, description=description)


def feedback(value: Any, rationale: str, metadata: dict[str, str]):
    """One row's verdict as MLflow's Feedback assessment."""
    from mlflow.entities import Feedback

    return Feedback(value=value, rationale=rationale, metadata=metadata)
