"""realign: an MLflow experiment platform for LLM safety realignment."""

__version__ = "0.1.0"
