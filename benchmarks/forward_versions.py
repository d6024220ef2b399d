"""The direct forward and the block kernel of this working tree against the same files at a git revision.

    python -m benchmarks.forward_versions --base REV [--cache 320] [--rounds 15] [--out FILE.json]

Loads ``src/restspec/decode/direct.py`` as it was at ``REV`` next to the installed one, and builds
``src/restspec/decode/blocks.c`` as it was there next to the current kernel, and times both versions
(with the model's own linears; with the packed kernels where oneDNN is built in; with the block kernel
where the model's weights are block-encoded and a C compiler builds it) on the embedded model over a
cache of ``--cache`` tokens of real text, at 1-64 inputs: every round runs every variant at every
width, so machine noise hits them alike; medians are reported. It also checks that both give the same
logits bit for bit (a change meant to be a pure speedup must). Only those two files are swapped: the
base version must run on this tree's other modules."""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from benchmarks.latency import random_tree, sample_text
from restspec.decode import blocks, compact_cache, forward_tree, new_cache, prefill
from restspec.decode.backends import DirectBackend, ModelForward
from restspec.decode.blocks import BlockWeights
from restspec.decode.budget import cpu_model_name
from restspec.decode.kernels import PackedWeights
from restspec.draft.tree import DraftTree

WIDTHS = (1, 2, 3, 4, 8, 12, 16, 32, 64)
"""Forward widths timed (root + draft nodes)."""
DIRECT_FILE = "src/restspec/decode/direct.py"
BLOCKS_FILE = "src/restspec/decode/blocks.c"


def source_at(revision: str, path: str) -> str:
    """The text of the repository file ``path`` as it was at ``revision``."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout


def module_at(revision: str) -> ModuleType:
    """:data:`DIRECT_FILE` as it was at ``revision``, imported as a module of its own."""
    path = Path(tempfile.mkdtemp()) / "direct_base.py"
    path.write_text(source_at(revision, DIRECT_FILE), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("direct_base", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def variants(model, base: ModuleType, base_blocks: ctypes.CDLL | None) -> dict[str, DirectBackend]:
    """The base and the current direct forward, with stock linears and (where available) packed ones and
    block-encoded ones (the base's on the base's block kernel ``base_blocks``)."""
    weights = {"stock": (None, None), "packed": (PackedWeights.of(model),) * 2}
    if base_blocks is not None:
        weights["blocks"] = (BlockWeights.of(model, base_blocks), BlockWeights.of(model))
    out = {}
    for kind, (old_weights, new_weights) in weights.items():
        if kind != "stock" and (old_weights is None or new_weights is None):
            continue
        current = DirectBackend(model, new_weights)
        old = DirectBackend(model, old_weights)
        old.direct = base.DirectForward(model, old_weights)
        out[f"base {kind}"], out[f"current {kind}"] = old, current
    return out


def measure(
    model, base: ModuleType, base_blocks: ctypes.CDLL | None, context: np.ndarray, rounds: int
) -> tuple[dict[str, dict[int, float]], dict[str, bool]]:
    """Median seconds per variant (:func:`variants`) and width, and whether each current variant's
    logits equal the base's bit for bit at every width."""
    found = variants(model, base, base_blocks)
    cache = new_cache()
    prefill(ModelForward(model), cache, context[:-1])
    past_len = len(context) - 1
    vocab = model.get_input_embeddings().num_embeddings
    trees = {w: random_tree(w - 1, seed=w, vocab=vocab) if w > 1 else DraftTree.empty() for w in WIDTHS}
    samples: dict[str, dict[int, list[float]]] = {name: {w: [] for w in WIDTHS} for name in found}
    same = {name: True for name in found if name.startswith("current")}
    for round_ in range(rounds + 1):  # the first round warms up and compares
        for width, tree in trees.items():
            logits = {}
            for name, backend in found.items():
                start = time.perf_counter()
                logits[name] = forward_tree(backend, cache, int(context[-1]), tree, past_len)
                seconds = time.perf_counter() - start
                compact_cache(cache, past_len, np.zeros(0, np.int64), len(tree))
                cache.crop(-1)  # drop the root row too: back to past_len
                if round_:
                    samples[name][width].append(seconds)
            if not round_:
                for name in same:
                    same[name] &= torch.equal(logits[name], logits[name.replace("current", "base")])
    return {n: {w: statistics.median(s) for w, s in by.items()} for n, by in samples.items()}, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose forward and kernel are compared")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cache", type=int, default=320, help="tokens in the KV cache")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    base = module_at(args.base)
    base_blocks = blocks.kernel(source_at(args.base, BLOCKS_FILE))
    from restspec.models import load_model

    loaded = load_model(args.model, dtype="float32")
    context = sample_text(args.cache + 1, loaded.tokenizer)
    with torch.inference_mode():
        medians, same = measure(loaded.model, base, base_blocks, context, args.rounds)
    print(f"{'ms':>16} " + " ".join(f"{w:>6}" for w in WIDTHS))
    for name, by in medians.items():
        print(f"{name:>16} " + " ".join(f"{by[w] * 1e3:6.1f}" for w in WIDTHS))
    print("bitwise the base's logits: " + ", ".join(f"{n}: {s}" for n, s in same.items()))
    if args.out is not None:
        report = {
            "base": args.base,
            "machine": {
                "cpu": cpu_model_name(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
            "model": loaded.name,
            "cache_tokens": args.cache,
            "rounds": args.rounds,
            "median_ms": {n: {str(w): round(s * 1e3, 2) for w, s in by.items()} for n, by in medians.items()},
            "bitwise_equal": same,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
