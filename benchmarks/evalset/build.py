"""Build restspec's evaluation set: five kinds of work beyond code and chat, from text on this machine.

    python -m benchmarks.evalset.build [--out benchmarks/evalset/evalset.jsonl]

Writes one MT-Bench-style JSON line per prompt (``question_id``, ``category``, ``turns``: one chat turn)
plus its ``source`` (see :class:`~benchmarks.evalset.sources.Provenance`) and, where there is one, a
``reference`` answer. The same installed versions give the same bytes (README.md says which).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.evalset import math_problems
from benchmarks.evalset.sources import Provenance, Service, botocore_services, pydoc_topic, readme_paragraph

DEFAULT_OUT = Path(__file__).with_name("evalset.jsonl")
PER_KIND = 24

SUMMARY_CHARS = (1500, 6000)
"""A service overview is summarized when its text is this long (characters, both ends included)."""
SUMMARY_MAX_LIST_SHARE = 0.4
"""... and at most this share of its lines are list items (the rest are too list-like to summarize)."""
SUMMARY_INSTRUCTIONS = (
    "Summarize the following passage in three or four sentences.",
    "Write a short summary of the following text for a reader who has never used this service.",
    "Summarize the following documentation as five bullet points.",
    "Give a one-sentence summary of the following text, then list its three most important details.",
)

QA_QUESTIONS = {
    "assert": (
        "What is `assert expression1, expression2` equivalent to, and what happens to assert "
        "statements when Python runs with the -O option?"
    ),
    "return": (
        "What happens when a return statement runs inside a try statement that has a finally clause, "
        "and what does return mean inside a generator function?"
    ),
    "global": (
        "Where must the names listed in a global statement not be used or defined, and why does a "
        "global statement inside a string passed to exec() not affect the code around the call?"
    ),
    "booleans": (
        "Which values count as false in a Boolean context, and what values do the `and` and `or` "
        "operators actually return? Give the example the section uses."
    ),
    "for": (
        "When does the else clause of a for loop run, and what happens if the loop body assigns a new "
        "value to the loop variable?"
    ),
    "with": (
        "List the steps Python takes to execute a with statement that has one item, and explain what "
        "happens when the suite raises an exception."
    ),
    "try": (
        "In what order are except clauses searched, what happens to the name given after `as` at the "
        "end of an except clause and why, and what happens when a finally clause executes a return "
        "statement?"
    ),
    "raise": (
        "What is the difference between `raise NewError() from exc`, raising a new exception inside "
        "an except clause without `from`, and `raise NewError() from None`?"
    ),
    "class": (
        "Describe what happens, step by step, when a class definition is executed, and how class "
        "decorators are applied."
    ),
    "function": (
        "When are default parameter values evaluated, why can a mutable default such as a list cause "
        "surprises, and what does the section recommend instead?"
    ),
    "import": (
        "What are the two steps of a basic import statement, and how does `from module import *` "
        "decide which names to bind, with and without `__all__`?"
    ),
    "naming": (
        "How does Python decide that a name is local to a block, what error is raised when a local "
        "name is used before it is bound, and how do global and nonlocal change this?"
    ),
    "exceptions": (
        "Which model of error handling does Python use, and what does the interpreter do when an "
        "exception is not handled at all?"
    ),
    "dict": (
        "What happens when the same key appears more than once in a dictionary display, and how does "
        "`**` unpacking inside a display work?"
    ),
    "slicings": (
        "How is a slicing such as `a[1:10:2]` turned into the key passed to `__getitem__()`, and how "
        "is the ambiguity between a subscription and a slicing resolved?"
    ),
    "context-managers": (
        "What arguments does `__exit__()` receive, and how can it keep an exception raised in the "
        "with block from propagating?"
    ),
    "augassign": (
        "How does `x += 1` differ from `x = x + 1`, and in what order are the two sides of an "
        "augmented assignment evaluated?"
    ),
    "async": (
        "Which constructs may only be used in the body of a coroutine function, and what is an `async "
        "for` loop semantically equivalent to?"
    ),
    "numeric-types": (
        "What should a method such as `__add__()` return when it does not support the other operand, "
        "and when is the reflected method `__radd__()` called instead?"
    ),
    "calls": (
        "Explain how the arguments of a call are matched to the parameters of a function: positional "
        "arguments, keyword arguments, default values, and the `*args` and `**kwargs` forms."
    ),
    "id-classes": (
        "Which classes of identifiers have special meanings according to this section, and what "
        "happens to a name of the form `__spam` inside a class definition?"
    ),
    "objects": (
        "What three things does every object have, which of them can change after the object is "
        "created, and what makes an object mutable or immutable?"
    ),
    "in": (
        "How does `x in y` work for strings, for containers such as lists and dictionaries, and for a "
        "user-defined class that defines `__iter__()` but not `__contains__()`?"
    ),
    "typesmethods": (
        "What are the `__self__` and `__func__` attributes of a bound method, and why does setting an "
        "attribute on a bound method raise an error?"
    ),
}

README_PARAGRAPHS = (
    ("flask", 2, "Flask is a lightweight"),
    ("flask", 3, "Flask offers suggestions"),
    ("rich", 138, "Rich can render beautiful tracebacks"),
    ("attrs", 34, "On the tin, attrs"),
    ("numpy", 10, "NumPy is a community-driven"),
    ("sympy", 65, "SymPy was started"),
    ("sympy", 67, "In 2011, Ondřej Čertík"),
    ("idna", 8, "This library provides support for Unicode"),
    ("trio", 1, "The Trio project's goal"),
    ("trio", 3, "This project is young"),
    ("sortedcontainers", 2, "Python's standard library is great"),
    ("wrapt", 5, "The wrapt module focuses"),
    ("wrapt", 39, "Using these checks"),
    ("decorator", 1, "The goal of the decorator module"),
    ("jedi", 7, "Jedi has a simple API"),
    ("orjson", 1, "orjson is a fast, correct JSON library"),
    ("orjson", 17, "To migrate from the standard library"),
    ("pexpect", 1, "Pexpect can be used"),
    ("prompt_toolkit", 21, "`prompt_toolkit` is cross platform"),
    ("accelerate", 63, "You should use"),
    ("transformers", 12, "Transformers standardizes"),
    ("anyio", 2, "Applications and libraries written against AnyIO"),
    ("tomlkit", 10, "`tomlkit` preserves the original layout"),
    ("boto3", 2, "Boto3 is the Amazon Web Services"),
)
"""(distribution, paragraph number, how it starts): prose paragraphs of permissively licensed READMEs."""
REWRITE_INSTRUCTIONS = (
    "Translate the following paragraph into French.",
    "Rewrite the following paragraph in plain language for someone who has never written a program.",
    "Translate the following paragraph into Spanish.",
    "Rewrite the following paragraph as a bulleted list of its key points.",
    "Translate the following paragraph into German.",
    "Rewrite the following paragraph in a formal tone suitable for a technical report.",
    "Shorten the following paragraph to at most two sentences without losing its meaning.",
    "Rewrite the following paragraph as a short, friendly email recommending this library to a colleague.",
)

MATH_SEED = 24
MATH_INSTRUCTION = "Solve this problem step by step, then give the final answer on a last line 'Answer: ...'."

RAG_PASSAGE_CHARS = (250, 1500)
"""An operation's description is a retrieved document when it is this long (characters)."""
RAG_CONTEXT_CHARS = (3800, 5000)
"""The documents of one prompt add up to this many characters (1,100-1,400 tokens with headers)."""
RAG_MAX_DOCUMENTS = 12
RAG_VERBS = {
    "adds": "add",
    "cancels": "cancel",
    "creates": "create",
    "deletes": "delete",
    "describes": "describe",
    "gets": "get",
    "lists": "list",
    "removes": "remove",
    "retrieves": "retrieve",
    "returns": "get",
    "starts": "start",
    "stops": "stop",
    "updates": "update",
}
"""How an operation's description starts (``Creates``, ``Creates or updates``) -> the question's verb."""


def _record(kind: str, number: int, prompt: str, source: Provenance, reference: str | None = None) -> dict:
    record = {
        "question_id": f"{kind}-{number:02d}",
        "category": kind,
        "turns": [prompt],
        "source": asdict(source),
    }
    if reference is not None:
        record["reference"] = reference
    return record


def _spread(items: list, count: int) -> list:
    """``count`` items evenly spaced through ``items`` (the middle of each of ``count`` equal stretches)."""
    if len(items) < count:
        raise ValueError(f"only {len(items)} candidates, need {count}")
    return [items[(2 * i + 1) * len(items) // (2 * count)] for i in range(count)]


def _list_share(text: str) -> float:
    lines = text.split("\n")
    return sum(line.startswith("- ") for line in lines) / len(lines)


def summary_services(services: tuple[Service, ...]) -> list[Service]:
    """The services whose overview is summarized: prose of a summarizable length, spread over the names."""
    lo, hi = SUMMARY_CHARS
    prose = [s for s in services if _list_share(s.overview) <= SUMMARY_MAX_LIST_SHARE]
    return _spread([s for s in prose if lo <= len(s.overview) <= hi], PER_KIND)


def summarization(services: tuple[Service, ...]) -> list[dict]:
    records = []
    for n, service in enumerate(summary_services(services), 1):
        instruction = SUMMARY_INSTRUCTIONS[(n - 1) % len(SUMMARY_INSTRUCTIONS)]
        prompt = f"{instruction}\n\nPassage (from the {service.full_name} API reference):\n{service.overview}"
        source = replace(service.provenance, parts=("documentation",))
        records.append(_record("summarization", n, prompt, source))
    return records


def document_qa() -> list[dict]:
    records = []
    for n, (topic, question) in enumerate(QA_QUESTIONS.items(), 1):
        text, source = pydoc_topic(topic)
        prompt = (
            "Read this section of the Python language reference, then answer the question below it using "
            f"only what the section says.\n\n{text}\n\nQuestion: {question}"
        )
        records.append(_record("document-qa", n, prompt, source))
    return records


def rewriting() -> list[dict]:
    records = []
    for n, (name, index, starts) in enumerate(README_PARAGRAPHS, 1):
        text, source = readme_paragraph(name, index, starts)
        instruction = REWRITE_INSTRUCTIONS[(n - 1) % len(REWRITE_INSTRUCTIONS)]
        records.append(_record("rewriting", n, f"{instruction}\n\n{text}", source))
    return records


def math_word_problems() -> list[dict]:
    records = []
    for n, problem in enumerate(math_problems.problems(PER_KIND, MATH_SEED), 1):
        source = Provenance(
            "restspec",
            "",
            "Apache-2.0",
            "benchmarks/evalset/math_problems.py",
            (f"template {problem.template}", f"seed {MATH_SEED}, problem {n}"),
            False,
        )
        prompt = f"{MATH_INSTRUCTION}\n\n{problem.question}"
        records.append(_record("math", n, prompt, source, problem.answer))
    return records


def rag_question(description: str) -> str | None:
    """A how-do-I question whose answer is the operation ``description`` describes, or None."""
    first = re.split(r"(?<=[a-z0-9)])\.(?:\s|$)", description.split("\n", 1)[0], maxsplit=1)[0]
    match = re.fullmatch(r"(\w+)(?: or (\w+))? ([a-z].{14,149})", first)
    if not match or any(v and v.lower() not in RAG_VERBS for v in match.group(1, 2)):
        return None
    verbs = " or ".join(RAG_VERBS[v.lower()] for v in match.group(1, 2) if v)
    return f"Which operation should I call to {verbs} {match.group(3)}? Explain briefly what it does."


def rag_documents(service: Service) -> tuple[list[str], str] | None:
    """The operations retrieved for one service's prompt (shuffled by a seeded RNG, added while they fit)
    and the one the question is about (its question fits no other); None when they do not fill a long
    context."""
    rng = random.Random(f"long-rag/{service.name}")
    lo, hi = RAG_PASSAGE_CHARS
    names = [name for name, text in service.operations.items() if lo <= len(text) <= hi]
    rng.shuffle(names)
    chosen: list[str] = []
    total = 0
    for name in names:
        size = len(service.operations[name])
        if total + size <= RAG_CONTEXT_CHARS[1] and len(chosen) < RAG_MAX_DOCUMENTS:
            chosen.append(name)
            total += size
    questions = [rag_question(service.operations[name]) for name in chosen]
    # a question another document would answer too is not asked
    askable = [name for name, q in zip(chosen, questions, strict=True) if q and questions.count(q) == 1]
    if total < RAG_CONTEXT_CHARS[0] or not askable:
        return None
    return chosen, rng.choice(askable)


def long_rag(services: tuple[Service, ...]) -> list[dict]:
    summarized = {s.name for s in summary_services(services)}
    fit = [s for s in services if s.name not in summarized and rag_documents(s)]
    records = []
    for n, service in enumerate(_spread(fit, PER_KIND), 1):
        chosen, target = rag_documents(service)
        documents = "\n\n".join(
            f"Document {i} ({service.full_name} API reference, operation {name}):\n{service.operations[name]}"
            for i, name in enumerate(chosen, 1)
        )
        prompt = (
            "Answer the question using only the documents below, which a search returned for it, and say "
            f"which document the answer comes from.\n\n{documents}\n\n"
            f"Question: {rag_question(service.operations[target])}"
        )
        source = replace(service.provenance, parts=tuple(chosen))
        reference = f"Document {chosen.index(target) + 1}: {target}"
        records.append(_record("long-rag", n, prompt, source, reference))
    return records


KINDS: dict[str, Callable[[], list[dict]]] = {
    "summarization": lambda: summarization(botocore_services()),
    "document-qa": document_qa,
    "rewriting": rewriting,
    "math": math_word_problems,
    "long-rag": lambda: long_rag(botocore_services()),
}


def build() -> list[dict]:
    """Every record of the evaluation set, kind by kind."""
    return [record for make in KINDS.values() for record in make()]


def render(records: list[dict]) -> str:
    """The JSONL text of ``records`` (UTF-8, one object per line)."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(
    out: Annotated[Path, typer.Option(help="Where to write the JSONL workload.")] = DEFAULT_OUT,
) -> None:
    records = build()
    out.write_text(render(records), encoding="utf-8")
    for kind in KINDS:
        sizes = [len(r["turns"][0]) for r in records if r["category"] == kind]
        print(f"{kind:14} {len(sizes):3} prompts, {min(sizes):,}-{max(sizes):,} characters")
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
