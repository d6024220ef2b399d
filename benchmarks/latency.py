"""Decode latency on the embedded model: forward cost by tree size, and the loop's non-model time.

    python -m benchmarks.latency [--model smollm2] [--cache 500] [--repeats 10] [--threads N] [--out FILE]

Measures, on a cache of ``--cache`` tokens of real text:
1. the forward pass over root + n draft nodes, n in 0 (a plain step), 1, 4, 8, 16, 32, 64;
2. the non-model time of a step (mask building, acceptance, KV compaction, bookkeeping; drafting
   excluded), from the generate loop's own StepStats and per component;
3. the plain loop (empty drafter) against ``model.generate`` (greedy, same tokens).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from restspec.decode import (
    GenerationConfig,
    SamplingConfig,
    SpeculativeGenerator,
    compact_cache,
    forward_tree,
    model_layout,
    new_cache,
    prefill,
    tree_attention_bias,
)
from restspec.decode.accept import greedy_accept, sample_accept
from restspec.decode.backends import ModelForward, candidates, choose_backend
from restspec.draft.base import StatelessDrafter
from restspec.draft.tree import DraftTree

TREE_SIZES = (0, 1, 4, 8, 16, 32, 64)
STEP_TREE_SIZE = 8
NGRAM = 3
"""Prompt-lookup drafter: match the last NGRAM tokens in the context, draft what followed."""
LOOP_NEW_TOKENS = 64


def sample_text(min_tokens: int, tokenizer) -> np.ndarray:
    """Real text (Python standard library source) of at least ``min_tokens`` tokens."""
    import json.decoder
    import textwrap

    text = inspect.getsource(json.decoder) + inspect.getsource(textwrap)
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
    while len(ids) < min_tokens:
        ids = np.concatenate([ids, ids])
    return ids[:min_tokens]


def random_tree(size: int, seed: int, vocab: int) -> DraftTree:
    """A bushy prefix-closed tree of ``size`` nodes (each node's parent drawn among earlier nodes)."""
    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, size)]
    tokens = rng.choice(vocab, size=size, replace=False)
    return DraftTree(tokens[:size], np.asarray(parents[:size]))


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


class PromptLookupDrafter(StatelessDrafter):
    """Drafts a chain: the tokens that followed the last occurrence of the context's last NGRAM tokens."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        if len(context) <= NGRAM or budget == 0:
            return DraftTree.empty()
        key = context[-NGRAM:]
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], NGRAM)
        hits = np.flatnonzero((windows == key).all(axis=1))
        if len(hits) == 0:
            return DraftTree.empty()
        start = int(hits[-1]) + NGRAM
        return DraftTree.chain(context[start : start + budget])


VARIANTS = {
    "stock": "model",
    "direct": "direct",
    "direct-packed": "direct-packed",
    "direct-blocks": "direct-blocks",
}
"""The forwards compared, by forward backend (:mod:`restspec.decode.backends`): the model's own forward
(as ``model.generate`` runs it); the direct forward (:mod:`restspec.decode.direct`) with the model's own
linears, with packed kernels, and computing from block-encoded weights; a model without one of them
runs its own forward in its place."""


def forward_latency(model, context: np.ndarray, repeats: int) -> dict[str, dict[int, list[float]]]:
    """Seconds of one forward per tree size and :data:`VARIANTS` entry, interleaved so that machine
    noise hits all alike (two warm-up rounds)."""
    found = {b.name: b for b in candidates(model)}
    backends = {variant: found.get(name, found["model"]) for variant, name in VARIANTS.items()}
    cache = new_cache()
    prefill(found["model"], cache, context[:-1])
    past_len = len(context) - 1
    vocab = model.get_input_embeddings().num_embeddings
    trees = {
        size: random_tree(size, seed=size, vocab=vocab) if size else DraftTree.empty() for size in TREE_SIZES
    }
    out: dict[str, dict[int, list[float]]] = {name: {} for name in VARIANTS}
    for round_ in range(repeats + 2):
        for size, tree in trees.items():
            for name, backend in backends.items():
                start = time.perf_counter()
                forward_tree(backend, cache, int(context[-1]), tree, past_len)
                seconds = time.perf_counter() - start
                compact_cache(cache, past_len, np.zeros(0, np.int64), len(tree))
                cache.crop(-1)  # drop the root row too: back to past_len
                if round_ >= 2:
                    out[name].setdefault(size, []).append(seconds)
    return out


def component_times(model, context: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds of each non-model part of a step with an 8-node tree."""
    layout = model_layout(model)
    past_len = len(context) - 1
    tree = random_tree(STEP_TREE_SIZE, seed=1, vocab=model.get_input_embeddings().num_embeddings)
    backend = ModelForward(model, layout)
    cache = new_cache()
    prefill(backend, cache, context[:-1])
    logits = forward_tree(backend, cache, int(context[-1]), tree, past_len).float()
    nucleus = SamplingConfig(temperature=0.8, top_p=0.95, top_k=50)
    gen = torch.Generator().manual_seed(0)
    deep_path = max(tree.paths(), key=len)
    base = {layer_idx: (layer.keys, layer.values) for layer_idx, layer in enumerate(cache.layers)}

    def restore() -> None:
        for layer_idx, layer in enumerate(cache.layers):
            layer.keys, layer.values = base[layer_idx]

    def gather() -> None:
        restore()
        compact_cache(cache, past_len, deep_path, len(tree))

    parts = {
        "mask + position ids (8 nodes)": lambda: (
            tree_attention_bias(tree, past_len, layout.dtype),
            tree.position_ids(past_len),
        ),
        "greedy acceptance": lambda: greedy_accept(tree, logits),
        "sampling acceptance (T=0.8, top-k 50, top-p 0.95)": lambda: sample_accept(
            tree, logits, nucleus, gen
        ),
        f"KV compaction, gather of a depth-{len(deep_path)} path": gather,
    }
    out = {name: statistics.median(timed(fn, repeats * 5)) for name, fn in parts.items()}
    restore()
    return out


def loop_stats(model, tokenizer, prompt: np.ndarray, drafter, budget: int) -> dict[str, float]:
    gen = SpeculativeGenerator(model, tokenizer, drafter, budget=budget, backend=choose_backend(model))
    result = gen.generate(prompt, GenerationConfig(max_new_tokens=LOOP_NEW_TOKENS))
    steps = result.steps
    return {
        "tokens_per_s": result.tokens_per_s,
        "mean_accepted": result.mean_accepted,
        "forward_ms": 1e3 * statistics.mean(s.forward_s for s in steps),
        "non_model_ms": 1e3 * statistics.mean(s.accept_s for s in steps),
        "draft_ms": 1e3 * statistics.mean(s.draft_s for s in steps),
        "output": result.output_ids.tolist(),
    }


def hf_generate(model, prompt: np.ndarray) -> tuple[float, list[int]]:
    ids = torch.as_tensor(prompt.astype(np.int64))[None, :]
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=LOOP_NEW_TOKENS,
            min_new_tokens=LOOP_NEW_TOKENS,
            do_sample=False,
        )
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / elapsed, out[0, ids.shape[1] :].tolist()


def _median_spread(values: list[float]) -> str:
    q = np.percentile(np.asarray(values) * 1e3, [10, 50, 90])
    return f"{q[1]:.1f} ({q[0]:.1f}–{q[2]:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache", type=int, default=500, help="tokens in the KV cache")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from restspec.models import load_model

    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    context = sample_text(args.cache + 1, tokenizer)
    with torch.inference_mode():
        fwd = forward_latency(model, context, args.repeats)
        parts = component_times(model, context, args.repeats)
    single = statistics.median(fwd["stock"][0])  # a plain step with the model's own kernels

    # the loop: a prompt that repeats itself, so prompt lookup gets accepted drafts
    prompt = np.concatenate([context[:200], context[:150]])
    plain = loop_stats(model, tokenizer, prompt, None, 0)
    spec = loop_stats(model, tokenizer, prompt, PromptLookupDrafter(), STEP_TREE_SIZE)
    hf_tps, hf_out = hf_generate(model, prompt)
    plain2 = loop_stats(model, tokenizer, prompt, None, 0)

    lines = [
        f"Model `{loaded.name}` ({args.dtype}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"cache of {args.cache} tokens, {args.repeats} repeats.",
        "",
        "### Forward latency by tree size",
        "",
        "Stock: the model's own forward (as `model.generate` runs it). Direct: "
        "`restspec.decode.direct`, one loop over the layers with the model's own linears; "
        "direct-packed: the same with oneDNN-packed, grouped linears (`restspec.decode.kernels`); "
        "direct-blocks: the same computing from block-encoded weights (`restspec.decode.blocks`). "
        "A model without one of them runs its own forward in its column. "
        "Median ms (p10–p90); ratios are to the stock plain step.",
        "",
        "| draft nodes | tokens in the forward | "
        + " | ".join(f"{name} ms" for name in VARIANTS)
        + " | "
        + " | ".join(f"{name} vs plain step" for name in VARIANTS)
        + " |",
        "|---:|---:|" + "---:|" * (2 * len(VARIANTS)),
    ]
    for size in TREE_SIZES:
        times = [fwd[name][size] for name in VARIANTS]
        lines.append(
            f"| {size} | {size + 1} | "
            + " | ".join(_median_spread(t) for t in times)
            + " | "
            + " | ".join(f"{statistics.median(t) / single:.2f}×" for t in times)
            + " |"
        )
    lines += [
        "",
        f"### Non-model time per step (tree of {STEP_TREE_SIZE} nodes; drafting excluded)",
        "",
        "| part | median µs | share of a plain forward |",
        "|---|---:|---:|",
    ]
    for name, value in parts.items():
        lines.append(f"| {name} | {value * 1e6:.0f} | {100 * value / single:.2f}% |")
    lines += [
        "",
        f"Measured inside the generate loop ({LOOP_NEW_TOKENS} new tokens, greedy, StepStats.accept_s = "
        "mask + acceptance + compaction + bookkeeping):",
        "",
        "| loop | tokens/s | tokens per step | forward ms/step | non-model ms/step "
        "| non-model / plain forward |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, stats in (
        ("plain (EmptyDrafter)", plain),
        ("plain, second run", plain2),
        (f"prompt lookup, chain ≤ {STEP_TREE_SIZE}", spec),
    ):
        lines.append(
            f"| {name} | {stats['tokens_per_s']:.1f} | {stats['mean_accepted']:.2f} "
            f"| {stats['forward_ms']:.1f} | {stats['non_model_ms']:.2f} "
            f"| {100 * stats['non_model_ms'] / (single * 1e3):.1f}% |"
        )
    same = plain["output"] == hf_out == spec["output"]
    lines += [
        f"| `model.generate(do_sample=False)` | {hf_tps:.1f} | 1.00 | | | |",
        "",
        f"Outputs identical (plain loop, prompt lookup, model.generate): {same}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    print(json.dumps({"single_forward_ms": single * 1e3, "identical": same}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
