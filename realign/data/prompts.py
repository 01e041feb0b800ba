"""Prompt identity: every evaluation row carries `prompt_id`, a hash of its prompt text, so two runs that
answered the same prompts are compared prompt by prompt (paired), and a prompt set has one digest."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path


def prompt_id(text: str) -> str:
    """A stable id of a prompt: the first 16 hex digits of SHA-256 of its text (surrounding whitespace ignored)."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def prompt_set_digest(prompts: Sequence[str]) -> str:
    """One id for an ordered prompt set: equal digests, the same prompts in the same order."""
    digest = hashlib.sha256()
    for text in prompts:
        digest.update(prompt_id(text).encode() + b"\n")
    return digest.hexdigest()[:16]


# ---- prompt sets from files ------------------------------------------------------------------------------------
PROMPT_COLUMNS = ("prompt", "goal", "Behavior", "question", "text")  # tried in this order when none is named
PROMPT_FILE_KINDS = ".csv, .tsv, .jsonl, .txt (one prompt a line) or a `datasets` directory (save_to_disk)"


def read_prompt_file(path: str, column: str = "") -> tuple[list[str], str]:
    """Every prompt of a file, in file order, and the column they came from ("" for a text file).

    One RealignError line for whatever is wrong with the file: missing, empty, unreadable, of an unknown kind,
    without the column, or with a value that is not text.
    """
    from realign.errors import RealignError

    source = Path(path).expanduser()
    if not source.exists():
        raise RealignError(f"prompt file {path} does not exist", f"pass --eval.prompts <{PROMPT_FILE_KINDS}>")
    try:
        rows, columns = _read_rows(source)
    except RealignError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise RealignError(f"prompt file {path} cannot be read ({first})",
                           f"pass a readable {PROMPT_FILE_KINDS}") from None
    if not rows:
        raise RealignError(f"prompt file {path} holds no prompts", "pass a file with at least one prompt")
    if columns is None:  # a text file: each line is a prompt
        return [str(row) for row in rows], ""
    if column:
        if column not in columns:
            raise RealignError(f"prompt file {path} has no column {column!r} (it has: {', '.join(columns)})",
                               "pass --eval.prompts_column <one of those>")
        chosen = column
    else:
        found = [name for name in PROMPT_COLUMNS if name in columns]
        if not found:
            raise RealignError(f"prompt file {path} has none of the columns {', '.join(PROMPT_COLUMNS)} "
                               f"(it has: {', '.join(columns)})", "pass --eval.prompts_column <the prompt column>")
        chosen = found[0]
    prompts = []
    for number, row in enumerate(rows, start=1):
        value = row.get(chosen)
        if not isinstance(value, str) or not value.strip():
            raise RealignError(f"prompt file {path}, row {number}: column {chosen!r} is "
                               f"{'empty' if isinstance(value, str) or value is None else type(value).__name__}, "
                               "not text", "give every row a non-empty text prompt")
        prompts.append(value.strip())
    return prompts, chosen


def _read_rows(source: Path) -> tuple[list, list[str] | None]:
    """(rows, column names) of a prompt file; column names None for a text file (rows are lines)."""
    import csv
    import json

    from realign.errors import RealignError

    if source.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(source))
        if hasattr(dataset, "keys"):  # a DatasetDict: one split, or the test split
            splits = list(dataset.keys())
            dataset = dataset["test"] if "test" in splits else dataset[splits[0]]
        return [dict(row) for row in dataset], list(dataset.column_names)
    suffix = source.suffix.lower()
    text = source.read_text(encoding="utf-8")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [row for row in reader]
        return rows, list(reader.fieldnames or [])
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise RealignError(f"prompt file {source}, line {number} is not JSON",
                                       "write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise RealignError(f"prompt file {source}, line {number} is not a JSON object",
                                       "write one object per line, e.g. {\"prompt\": \"...\"}")
                rows.append(row)
        columns = sorted({key for row in rows for key in row})
        return rows, columns
    if suffix in (".txt", ""):
        return [line.strip() for line in text.splitlines() if line.strip()], None
    raise RealignError(f"prompt file {source} is a {suffix} file", f"pass a {PROMPT_FILE_KINDS}")
