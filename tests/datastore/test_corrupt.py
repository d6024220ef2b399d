"""A datastore damaged on disk: a clear DatastoreError (the file is corrupt, rebuild it) or correct
results, never a read outside the arrays; opening stays cheap (the body is checked lazily).

The damage is 16 bytes overwritten (all 0xff, all zero, or random) at the start, middle and end of
each section of a shard and inside its header; the searches run in a subprocess, where a crash would
show as a signal instead of taking pytest down."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from restspec.datastore import Datastore
from restspec.datastore.format import HEADER_BYTES, read_shard_header
from restspec.draft import DatastoreDrafter
from restspec.errors import DatastoreError

VOCAB = 40
PATTERNS = {"ones": b"\xff" * 16, "zeros": b"\0" * 16, "random": bytes(range(37, 37 + 16 * 13, 13))}
"""16-byte overwrites: 0xff makes suffix-array entries -1 and tokens above the separator."""
SPOTS = ("start", "middle", "end")


def documents() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=int(rng.integers(20, 200))) for _ in range(60)]


def contexts(docs: list[np.ndarray]) -> list[np.ndarray]:
    """Context windows that occur in the corpus (long matches) and random ones (short matches)."""
    rng = np.random.default_rng(1)
    found = [doc[max(0, end - 12) : end] for doc in docs for end in range(3, len(doc), 9)]
    return found + [rng.integers(0, VOCAB, size=8) for _ in range(50)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "ds"
    Datastore.build_from_tokens(documents(), path, vocab_size=VOCAB, fingerprint="corrupt-test")
    return path


def shard_of(path: Path) -> Path:
    return path / "shard-00000.rsds"


def damaged_copy(pristine: Path, tmp: Path, section: str, spot: str, pattern: str) -> Path:
    """A copy of ``pristine`` with 16 bytes of ``pattern`` at ``spot`` of ``section`` ("header" is
    the JSON metadata of the shard header)."""
    out = tmp / f"{section}-{spot}-{pattern}"
    out.mkdir()
    for file in pristine.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    meta, _ = read_shard_header(shard_of(out))
    if section == "header":
        start, nbytes = 20, len(json.dumps(meta, sort_keys=True))
    else:
        start, nbytes = meta["sections"][section]["offset"], meta["sections"][section]["nbytes"]
    offset = {"start": start, "middle": start + nbytes // 2, "end": start + nbytes - 16}[spot]
    with open(shard_of(out), "r+b") as f:
        f.seek(offset)
        f.write(PATTERNS[pattern])
    return out


CASES = [
    (section, spot, pattern)
    for section in ("tokens", "sa", "bucket")
    for spot in SPOTS
    for pattern in PATTERNS
]


def search_all(ds: Datastore, ctxs: list[np.ndarray]) -> list[tuple[int, int, list]]:
    out = []
    for ctx in ctxs:
        match = ds.longest_match(ctx)
        out.append((match.length, match.count, ds.continuations(match, k=50, m=4).tolist()))
    return out


SEARCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from restspec.datastore import Datastore
    from restspec.errors import DatastoreError

    contexts = [np.asarray(c, dtype=np.int64) for c in json.loads(sys.argv[1])]
    for path in sys.argv[2:]:
        try:
            ds = Datastore.open(path, verify="off")
            out = []
            for ctx in contexts:
                match = ds.longest_match(ctx)
                out.append([match.length, match.count, ds.continuations(match, k=50, m=4).tolist()])
            outcome = {"results": out}
        except DatastoreError as error:
            outcome = {"error": str(error)}
        print(json.dumps(outcome), flush=True)
    """
)


def test_damage_anywhere_in_the_body_gives_a_clear_error_or_correct_results(pristine, tmp_path):
    # checksums off: the open-time invariants and the kernels' index checks alone must keep every
    # read inside the arrays, and whatever they let through must still be well-formed
    docs = documents()
    ctxs = contexts(docs)
    expected = json.loads(json.dumps(search_all(Datastore.open(pristine, verify="off"), ctxs)))
    paths = [damaged_copy(pristine, tmp_path, *case) for case in CASES]
    run = subprocess.run(
        [sys.executable, "-c", SEARCH_SCRIPT, json.dumps([c.tolist() for c in ctxs]), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = run.stdout.splitlines()
    assert run.returncode == 0, (
        f"crashed (exit {run.returncode}) on {paths[len(lines)].name}: {run.stderr[-2000:]}"
    )
    outcomes = [json.loads(line) for line in lines]
    for case, outcome in zip(CASES, outcomes, strict=True):
        if "error" in outcome:
            assert "is corrupt" in outcome["error"] and "rebuild the datastore" in outcome["error"], case
            continue
        for (length, count, rows), ctx in zip(outcome["results"], ctxs, strict=True):
            assert 0 <= length <= len(ctx) and count >= 0, case
            assert all(-1 <= t < VOCAB for row in rows for t in row), case  # ids a drafter may propose
    # damage the searches visit is caught by the index checks (tokens 0xff: above the separator;
    # suffix array 0xff: -1, pointing before the stream; bucket 0xff: not non-decreasing)
    caught = {case for case, outcome in zip(CASES, outcomes, strict=True) if "error" in outcome}
    assert {("tokens", "middle", "ones"), ("sa", "middle", "ones"), ("bucket", "middle", "ones")} <= caught
    # and damage the searches never read leaves their results exactly as before
    assert any(outcome.get("results") == expected for outcome in outcomes)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_background_check_turns_any_body_damage_into_a_clear_error(pristine, tmp_path, case):
    path = damaged_copy(pristine, tmp_path, *case)
    try:
        ds = Datastore.open(path)  # opening reads headers and a few values, not the body
    except DatastoreError as error:  # unless those few values are what was damaged
        assert "is corrupt" in str(error) and "rebuild the datastore" in str(error)
        assert case[0] == "bucket" or (case[0] == "tokens" and case[1] != "middle")
        return
    with pytest.raises(DatastoreError, match=rf"is corrupt \(section '{case[0]}' has CRC-32"):
        ds.wait_verified(timeout=60)
    match = Datastore.open(pristine, verify="off").longest_match([1, 2, 3])
    for search in (lambda: ds.longest_match([1, 2, 3]), lambda: ds.continuations(match, k=5)):
        with pytest.raises(DatastoreError, match="rebuild the datastore"):
            search()
    with pytest.raises(DatastoreError, match=f"section '{case[0]}'"):
        Datastore.open(path, verify="now")


def test_drafting_from_a_damaged_datastore_fails_clearly(pristine, tmp_path):
    ds = Datastore.open(damaged_copy(pristine, tmp_path, "sa", "middle", "random"))
    drafter = DatastoreDrafter(ds)
    with pytest.raises(DatastoreError, match=r"is corrupt .* rebuild the datastore"):
        ds.wait_verified(timeout=60)
    with pytest.raises(DatastoreError, match=r"is corrupt .* rebuild the datastore"):
        drafter.propose(documents()[0][:10].astype(np.int32), budget=8)


def test_header_damage_fails_at_open_or_is_harmless(pristine, tmp_path):
    docs = documents()
    ctxs = contexts(docs)[:40]
    expected = search_all(Datastore.open(pristine, verify="off"), ctxs)
    for spot in SPOTS:  # inside the JSON metadata: its CRC fails
        with pytest.raises(DatastoreError, match="corrupt header"):
            Datastore.open(damaged_copy(pristine, tmp_path, "header", spot, "random"))
    padding = tmp_path / "padding"  # the zero padding after the metadata is read by nothing
    padding.mkdir()
    for file in pristine.iterdir():
        (padding / file.name).write_bytes(file.read_bytes())
    with open(shard_of(padding), "r+b") as f:
        f.seek(HEADER_BYTES - 100)
        f.write(PATTERNS["random"])
    ds = Datastore.open(padding, verify="now")
    assert search_all(ds, ctxs) == expected


@pytest.mark.parametrize(
    ("section", "index", "value", "message"),
    [
        ("tokens", 0, 3, "does not start and end with the separator"),
        ("tokens", -1, 3, "does not start and end with the separator"),
        ("bucket", 0, 1, "bucket table"),
        ("bucket", -1, 7, "bucket table"),
        ("bucket", 5, 10**6, "bucket table"),
    ],
)
def test_open_checks_the_invariants_a_few_reads_can_check(pristine, tmp_path, section, index, value, message):
    path = tmp_path / "ds"
    path.mkdir()
    for file in pristine.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    meta, _ = read_shard_header(shard_of(path))
    info = meta["sections"][section]
    dtype = np.dtype(info["dtype"])
    position = index % info["length"]
    with open(shard_of(path), "r+b") as f:
        f.seek(info["offset"] + position * dtype.itemsize)
        f.write(np.array([value], dtype=dtype).tobytes())
    with pytest.raises(DatastoreError, match=rf"is corrupt \(.*{message}.*\); rebuild the datastore"):
        Datastore.open(path, verify="off")


def test_verify_modes(pristine, tmp_path):
    with pytest.raises(ValueError, match="verify='sometimes' must be"):
        Datastore.open(pristine, verify="sometimes")
    assert Datastore.open(pristine).wait_verified(timeout=60) is True  # background: finishes, finds nothing
    assert Datastore.open(pristine, verify="off").wait_verified() is False  # nothing started
    built = Datastore.build_from_tokens([[1, 2, 3]], tmp_path / "new", vocab_size=VOCAB, fingerprint="x")
    assert built.wait_verified() is False  # what a build just wrote is not read back
