"""Datastore commands: ``restspec build``, ``restspec inspect`` and ``restspec lookup``."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from restspec.cli.app import app
from restspec.cli.common import EMBEDDED_MODEL, ModelOption, cli_errors, stderr_console
from restspec.progress import ConsoleProgress

TOP_CONTINUATIONS = 5
"""Distinct continuations `lookup` shows (most frequent first)."""


def _tokenizer(spec: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from restspec.models import load_tokenizer

    with ConsoleProgress(stderr_console()).phase(f"Loading tokenizer of {spec}"):
        return load_tokenizer(spec)


def _out(text: str) -> None:
    typer.echo(text)


@cli_errors
def build(
    corpus: Annotated[list[str], typer.Argument(help="Files, folders, or '-' for stdin (one document).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Datastore folder to create.")],
    model: ModelOption = EMBEDDED_MODEL,
    glob: Annotated[
        str | None, typer.Option("--glob", help="Files to take from folders, e.g. '**/*.py' (default: all).")
    ] = None,
    jsonl_field: Annotated[
        str | None,
        typer.Option("--jsonl-field", help="Read JSON Lines; each line's FIELD (a string) is one document."),
    ] = None,
    shard_tokens: Annotated[
        int, typer.Option("--shard-tokens", help="Tokens per shard (bounds the RAM a build needs).")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Tokenize a corpus with MODEL's tokenizer into a datastore (suffix array, memory-mappable)."""
    from restspec.datastore import DEFAULT_SHARD_TOKENS, Datastore
    from restspec.errors import CorpusError

    if shard_tokens < 0:
        raise CorpusError(
            f"--shard-tokens={shard_tokens} must be >= 1 (0 = default {DEFAULT_SHARD_TOKENS:,})"
        )
    tokenizer = _tokenizer(model)
    ds = Datastore.build(
        corpus,
        out,
        tokenizer,
        glob=glob,
        jsonl_field=jsonl_field,
        shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS,
        progress=not quiet,
        overwrite=force,
    )
    summary = ds.corpus_stats.summary() if ds.corpus_stats else ""
    _out(
        f"built {ds.path}: {ds.num_tokens:,} tokens, {ds.num_docs:,} documents, "
        f"{len(ds.shards)} shard(s); {summary}"
    )


@cli_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Datastore folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Also read every byte and check the checksums (slow on big ones)."),
    ] = False,
) -> None:
    """Show a datastore's header: tokenizer fingerprint, vocabulary, counts, shards, size."""
    from restspec.datastore import Datastore

    ds = Datastore.open(path, verify="now" if verify else "off")
    info = ds.info()
    if verify:
        info["verified"] = True
    if as_json:
        _out(json.dumps(info, indent=1))
        return
    _out(
        f"{info['path']}: {info['num_tokens']:,} tokens in {info['num_docs']:,} documents, "
        f"{len(info['shards'])} shard(s), {info['bytes_on_disk']:,} bytes"
    )
    _out(
        f"format v{info['format_version']}, tokens {info['token_dtype']}, vocabulary {info['vocab_size']:,}, "
        f"tokenizer {info['tokenizer_fingerprint']}"
    )
    for s in info["shards"]:
        _out(f"  {s['file']}: {s['num_tokens']:,} tokens, {s['num_docs']:,} docs, sa {s['sa_dtype']}")
    if verify:
        _out("checksums: OK")


@cli_errors
def lookup(
    path: Annotated[Path, typer.Argument(help="Datastore folder.")],
    text: Annotated[str, typer.Option("--text", "-t", help="Context whose longest suffix is looked up.")],
    model: ModelOption = EMBEDDED_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    k: Annotated[int, typer.Option("--k", help="Occurrences to gather (>= 1).")] = 5000,
    m: Annotated[int, typer.Option("--m", help="Tokens per continuation (>= 1).")] = 10,
    max_len: Annotated[int, typer.Option("--max-len", help="Longest suffix tried.")] = 16,
    min_len: Annotated[int, typer.Option("--min-len", help="Shortest suffix accepted.")] = 2,
) -> None:
    """Longest suffix of --text found in the datastore, its occurrences and most frequent continuations
    (the datastore's checksums are checked first: about 2.5 s per GB)."""
    from restspec.datastore import Datastore
    from restspec.errors import RestspecError

    for flag, value, low in (
        ("--k", k, 1),
        ("--m", m, 1),
        ("--min-len", min_len, 1),
        ("--max-len", max_len, min_len),
    ):
        if value < low:
            raise RestspecError(f"{flag}={value} must be >= {low}")
    tokenizer = _tokenizer(model)
    ds = Datastore.open(path, tokenizer, verify="now")  # a lookup must not answer from a damaged file
    ids = tokenizer.encode(text, add_special_tokens=False)
    match = ds.longest_match(ids, max_len=max_len, min_len=min_len)
    conts = ds.continuations(match, k=k, m=m)
    counts = Counter(tuple(t for t in row if t >= 0) for row in conts.tolist())
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONTINUATIONS]
    next_counts = Counter(t for t in conts[:, 0].tolist() if t >= 0)
    next_top = sorted(next_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONTINUATIONS]
    result = {
        "context_tokens": len(ids),
        "match_length": match.length,
        "matched_text": tokenizer.decode(ids[len(ids) - match.length :]) if match.length else "",
        "occurrences": match.count,
        "gathered": len(conts),
        "continuations": [
            {"count": c, "ids": list(row), "text": tokenizer.decode(list(row))} for row, c in top
        ],
        "next_tokens": [{"count": c, "id": t, "text": tokenizer.decode([t])} for t, c in next_top],
    }
    if as_json:
        _out(json.dumps(result, indent=1, ensure_ascii=False))
        return
    if not match.length:
        _out(f"no suffix of at least {min_len} tokens of the text occurs in {path}")
        return
    _out(f"match: {match.length} tokens {result['matched_text']!r}, {match.count:,} occurrences")
    _out(f"next token (over {len(conts):,} gathered occurrences):")
    for c in result["next_tokens"]:
        _out(f"  {c['count']:>6,} × {c['text']!r}")
    _out("most frequent continuations:")
    for c in result["continuations"]:
        _out(f"  {c['count']:>6,} × {c['text']!r}")


app.command("build")(build)
app.command("inspect")(inspect)
app.command("lookup")(lookup)
