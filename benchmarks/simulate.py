"""A CPU simulator for drafting: replay recorded greedy outputs through a drafter, no model needed.

Step 1, :func:`record_references`: plain greedy decoding of the embedded model on a workload (raw
HumanEval prompts, or any ``restspec bench`` workload, chat turns included), recording at every
position of prompt and output the model's top-k next tokens.
Saved once to an ``.npz`` cache; a few minutes on two cores.

Step 2, :func:`replay`: for every reference and every step, the drafter proposes a tree with budget
``b`` for the true context; the accepted tokens are the longest tree path that matches the recorded
greedy continuation, plus the model's own next token (the bonus token), exactly what greedy
verification would accept. The context advances by those tokens and ``observe()`` is called.

What is approximated: the model's verification logits. The ``TreeLogits`` passed to ``observe()``
has a row for the root and every tree node, as a real step's, but only the root's and the
*accepted* nodes' rows hold anything (exact in rank: the recorded top-k of the reference position,
with synthetic logits ``-rank`` so ``top_candidates`` returns them in the recorded order, and
everything outside the top-k at a large negative value). The other nodes' inputs are marked -1,
because the model's outputs after an off-reference token were never recorded; a real decoder shows
the drafter those rows too, so recycling drafters learn a little more in real runs than here.
Everything else (the accepted length per step) is exact for greedy decoding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from restspec.bench.workloads import BenchItem
from restspec.decode.warm import WarmStart
from restspec.draft.base import Drafter, Step, TreeLogits
from restspec.draft.tree import DraftTree

MODEL_NAME = "smollm2-135m-instruct-q4_1"
RECORDED_TOP_K = 8
"""Top candidates recorded per position (Token Recycling keeps 8 per token)."""
SYNTHETIC_FLOOR = -1.0e4
"""Logit given to every token outside the recorded top-k in synthesized ``TreeLogits``."""


@dataclass(frozen=True, eq=False)
class Reference:
    """One recorded greedy run. ``prompt``: int32[P]; ``output``: int32[T];
    ``top``: int32[P + T, K], the model's top-K next tokens after each position of prompt + output
    (row P - 1 + t predicts ``output[t]``, so ``top[P - 1 + t, 0] == output[t]``)."""

    name: str
    prompt: np.ndarray
    output: np.ndarray
    top: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.prompt) + len(self.output)
        if self.top.ndim != 2 or self.top.shape[0] != n:
            raise ValueError(f"top must have shape [{n}, K], got {self.top.shape}")


def cache_dir() -> Path:
    """Where recorded references live: ``$RESTSPEC_CACHE/simulate`` (default ``~/.cache/restspec``)."""
    from restspec.datastore.default import cache_dir as cache_root

    return cache_root() / "simulate"


def _load_model():
    """(model, tokenizer, name) of the embedded model in float32, offline."""
    from restspec.models import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2")
    return loaded.model, loaded.tokenizer, loaded.name


def greedy_with_candidates(model, prompt: np.ndarray, max_new_tokens: int, eos: Sequence[int], top_k: int):
    """Plain greedy decoding with a KV cache. Returns (output int32[T], top int32[P + T, top_k])."""
    import torch
    from transformers import DynamicCache

    from restspec.decode.verify import model_layout

    cache_kwargs = {model_layout(model).cache_argument: DynamicCache()}
    tops: list[np.ndarray] = []
    out: list[int] = []
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    past = 0
    with torch.inference_mode():
        while True:
            n = ids.shape[1]
            position_ids = torch.arange(past, past + n)[None]
            logits = model(input_ids=ids, position_ids=position_ids, use_cache=True, **cache_kwargs).logits
            past += n
            # (1, n, V) -> top-k per position, best first (ties: lower id first, like argmax)
            top = torch.topk(logits[0].float(), top_k, dim=-1, sorted=True).indices.numpy().astype(np.int32)
            tops.append(top)
            nxt = int(logits[0, -1].argmax())
            if top[-1, 0] != nxt:  # topk and argmax disagree only on exact ties; argmax is the greedy rule
                top[-1] = np.concatenate(([nxt], top[-1][top[-1] != nxt]))[:top_k]
            out.append(nxt)
            if nxt in eos or len(out) >= max_new_tokens:
                break
            ids = torch.tensor([[nxt]])
    top_all = np.concatenate(tops)[: len(prompt) + len(out)]
    if len(top_all) < len(prompt) + len(out):  # the last token was never fed: no row after it
        top_all = np.concatenate([top_all, np.full((1, top_k), -1, np.int32)])
    return np.asarray(out, np.int32), top_all


def record_references(
    path: Path,
    items: Sequence[BenchItem],
    max_new_tokens: int = 128,
    top_k: int = RECORDED_TOP_K,
    progress: Callable[[str], None] | None = print,
) -> list[Reference]:
    """Record greedy references of the embedded model on benchmark ``items``, one per turn.

    A completion item is its raw prompt; a chat item goes through the chat template, each later turn
    after the model's own greedy answer to the one before, as ``restspec bench`` asks it. References
    are named by item id (``item_id#turn`` from the second turn on) and saved after every turn to
    ``path.partial.npz``, from which an interrupted run resumes."""
    from restspec.bench.runner import answer_text, prompt_ids

    model, tokenizer, name = _load_model()
    eos = [t for t in [tokenizer.eos_token_id] if t is not None]
    partial = path.with_name(path.stem + ".partial.npz")
    refs = load_references(partial) if partial.exists() else []
    total = sum(len(item.turns) for item in items)
    done = 0
    t0 = time.perf_counter()
    for item in items:
        messages: list[dict[str, str]] = []
        for turn, text in enumerate(item.turns):
            messages.append({"role": "user", "content": text})
            if done < len(refs):  # recorded before an interruption
                output = refs[done].output
            else:
                prompt = np.asarray(prompt_ids(tokenizer, item, messages), np.int32)
                output, top = greedy_with_candidates(model, prompt, max_new_tokens, eos, top_k)
                label = item.item_id if turn == 0 else f"{item.item_id}#{turn}"
                refs.append(Reference(label, prompt, output, top))
                save_references(partial, refs, model_name=name)
                if progress:
                    elapsed = time.perf_counter() - t0
                    progress(f"[{done + 1}/{total}] {label}: {len(output)} tokens, {elapsed:.0f} s")
            messages.append({"role": "assistant", "content": answer_text(tokenizer, output)})
            done += 1
    save_references(path, refs, model_name=name)
    partial.unlink(missing_ok=True)
    return refs


def save_references(path: Path, refs: Sequence[Reference], model_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"model": np.asarray(model_name), "names": np.asarray([r.name for r in refs])}
    for i, r in enumerate(refs):
        arrays[f"prompt_{i}"] = r.prompt
        arrays[f"output_{i}"] = r.output
        arrays[f"top_{i}"] = r.top
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_references(path: Path) -> list[Reference]:
    with np.load(path) as data:
        names = data["names"].tolist()
        return [
            Reference(str(name), data[f"prompt_{i}"], data[f"output_{i}"], data[f"top_{i}"])
            for i, name in enumerate(names)
        ]


def accepted_path(tree: DraftTree, truth: np.ndarray) -> np.ndarray:
    """int32[a]: the nodes greedy verification accepts, the longest tree path equal to a prefix of
    ``truth``."""
    children: dict[tuple[int, int], int] = {
        (parent, tok): i
        for i, (tok, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True))
    }
    node, path = -1, []
    for tok in truth.tolist():
        node = children.get((node, tok), -2)
        if node == -2:
            break
        path.append(node)
    return np.asarray(path, np.int32)


def longest_accepted(tree: DraftTree, truth: np.ndarray) -> int:
    """Draft tokens greedy verification accepts (:func:`accepted_path`)."""
    return len(accepted_path(tree, truth))


def synthesized_logits(input_ids: np.ndarray, top: np.ndarray, vocab_size: int) -> TreeLogits:
    """TreeLogits whose row r ranks ``top[r]`` first to last (logit -rank) and every other token at
    ``SYNTHETIC_FLOOR``: ``top_candidates(k)`` then returns the recorded candidates exactly."""
    logits = np.full((len(input_ids), vocab_size), SYNTHETIC_FLOOR, np.float32)
    rows = np.repeat(np.arange(len(input_ids)), top.shape[1])
    cols = top.reshape(-1)
    ranks = np.tile(-np.arange(top.shape[1], dtype=np.float32), len(input_ids))
    ok = cols >= 0
    logits[rows[ok], cols[ok]] = ranks[ok]
    return TreeLogits(np.asarray(input_ids, np.int32), logits)


def step_logits(tree: DraftTree, path: np.ndarray, root: int, top: np.ndarray, vocab_size: int) -> TreeLogits:
    """The verification logits a replay can give for a step that verified ``tree`` below ``root`` and
    accepted ``path``: one row for the root and one per node, as a real step's; ``top``:
    int32[len(path) + 1, K], the recorded ranking after the root and after each accepted node. Every
    other node's input is -1 (no recorded row) and its row is flat."""
    rows = np.asarray(path, np.int64) + 1
    inputs = np.full(len(tree) + 1, -1, np.int32)
    inputs[0] = root
    inputs[rows] = tree.tokens[path]
    ranking = np.full((len(tree) + 1, top.shape[1]), -1, np.int32)
    ranking[0] = top[0]
    ranking[rows] = top[1:]
    return synthesized_logits(inputs, ranking, vocab_size)


@dataclass(frozen=True)
class ReplayResult:
    """What one drafter achieved at one budget over all references."""

    drafter: str
    budget: int
    steps: int
    """Verification steps taken (one per propose)."""
    tokens: int
    """Tokens generated (accepted drafts + one model token per step)."""
    drafted: int
    """Draft nodes proposed in total."""
    propose_s: float
    """Wall time spent in propose + observe."""

    @property
    def mean_accepted(self) -> float:
        """Mean tokens gained per step, the model's own next token included (1.0 = no speedup)."""
        return self.tokens / max(self.steps, 1)


def replay(
    refs: Sequence[Reference],
    drafter: Drafter,
    budget: int,
    vocab_size: int,
    name: str = "",
    on_step: Callable[[DraftTree, np.ndarray], None] | None = None,
) -> ReplayResult:
    """Replay ``refs`` in order through one ``drafter`` at a fixed ``budget`` (see module docstring).

    The same drafter object sees every reference, so state kept across requests (past outputs,
    recycling tables) holds only references replayed before the current one. ``on_step`` gets every
    step's tree and its accepted path (node indices)."""
    steps = tokens = drafted = 0
    spent = 0.0
    for ref in refs:
        prompt_len = len(ref.prompt)
        full = np.concatenate([ref.prompt, ref.output]).astype(np.int32)
        drafter.start_request(ref.prompt)
        try:
            pos = 0  # output tokens known so far
            while pos < len(ref.output):
                context = full[: prompt_len + pos]
                t0 = time.perf_counter()
                tree = drafter.propose(context, budget)
                spent += time.perf_counter() - t0
                if len(tree) > budget:
                    raise AssertionError(f"{name}: tree of {len(tree)} nodes over budget {budget}")
                truth = ref.output[pos:]
                path = accepted_path(tree, truth)[: len(truth) - 1]
                if on_step is not None:
                    on_step(tree, path)
                n_draft = len(path)
                gained = truth[: n_draft + 1]  # accepted drafts + the model's own next token
                # recorded rows: after the root (context[-1]) and after each accepted draft node
                top = ref.top[prompt_len + pos - 1 : prompt_len + pos + n_draft]
                logits = step_logits(tree, path, int(context[-1]), top, vocab_size)
                t0 = time.perf_counter()
                drafter.observe(Step(context, tree, path, gained, logits, proposal=tree))
                spent += time.perf_counter() - t0
                steps += 1
                tokens += len(gained)
                drafted += len(tree)
                pos += len(gained)
        finally:
            drafter.stop_request()
    return ReplayResult(name, budget, steps, tokens, drafted, spent)


DRAFTER_NAMES = ("datastore", "context", "history", "recycle", "merged")
DEFAULT_BUDGETS = (4, 8, 16, 32, 64)


def make_drafter(name: str, datastores: Sequence, vocab_size: int, warm: WarmStart | None = None) -> Drafter:
    """A fresh drafter by name (``DRAFTER_NAMES``); ``merged`` is :func:`default_drafter`. With
    ``warm``, it starts from that warm start, as restspec's engine does (the default drafter loads
    its learned state; any other replays the warm start's conversations as finished requests)."""
    from restspec.draft import (
        ContextDrafter,
        DatastoreDrafter,
        HistoryDrafter,
        RecycleDrafter,
        default_drafter,
    )

    factories: dict[str, Callable[[], Drafter]] = {
        "datastore": lambda: DatastoreDrafter(datastores),
        "context": ContextDrafter,
        "history": HistoryDrafter,
        "recycle": lambda: RecycleDrafter(vocab_size),
        "merged": lambda: default_drafter(datastores, vocab_size),
    }
    if name not in factories:
        raise ValueError(f"drafter={name!r} must be one of {', '.join(factories)}")
    drafter = factories[name]()
    if warm is not None:
        warm.apply(drafter)
    return drafter


def simulate(
    refs: Sequence[Reference],
    datastores: Sequence,
    vocab_size: int,
    drafters: Sequence[str] = DRAFTER_NAMES,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    progress: Callable[[ReplayResult], None] | None = None,
    warm: WarmStart | None = None,
) -> list[ReplayResult]:
    """Replay every (drafter, budget) pair with a fresh drafter each (started from ``warm``, if given)."""
    results = []
    for name in drafters:
        for budget in budgets:
            drafter = make_drafter(name, datastores, vocab_size, warm)
            result = replay(refs, drafter, budget, vocab_size, name)
            results.append(result)
            if progress:
                progress(result)
    return results


CALIBRATION_EDGES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Bins of node weight for :func:`calibration_table` (the last one holds 1.0)."""


def calibration_table(
    refs: Sequence[Reference],
    datastores: Sequence,
    vocab_size: int,
    budget: int,
    warm: WarmStart | None = None,
) -> str:
    """How often the default drafter's nodes were accepted, by the weight it gave them (its estimate of
    that chance, which the budget policies rank and price nodes by), replayed at ``budget``: every
    node, and the root's children alone (the first draft token). A node counts as accepted when it is
    on the step's accepted path."""
    weights: list[np.ndarray] = []
    accepted: list[np.ndarray] = []
    first: list[np.ndarray] = []

    def collect(tree: DraftTree, path: np.ndarray) -> None:
        on_path = np.zeros(len(tree), bool)
        on_path[np.asarray(path, np.int64)] = True
        weights.append(np.asarray(tree.weights, np.float64))
        accepted.append(on_path)
        first.append(np.asarray(tree.parents) < 0)

    replay(refs, make_drafter("merged", datastores, vocab_size, warm), budget, vocab_size, "merged", collect)
    w, a, f = (np.concatenate(x) if x else np.zeros(0) for x in (weights, accepted, first))
    a, f = a.astype(bool), f.astype(bool)
    edges = np.asarray(CALIBRATION_EDGES)
    bins = np.minimum(np.searchsorted(edges, w, side="right") - 1, len(edges) - 2)
    lines = [
        f"Node weights of the default drafter against acceptance, replayed at {budget} nodes "
        f"({len(w):,} nodes, {int(f.sum()):,} of them the root's children):",
        "",
        "| weight | nodes | mean weight | accepted | root's children | mean weight | accepted |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in range(len(edges) - 1):
        cells = []
        for mask in (bins == b, (bins == b) & f):
            n = int(mask.sum())
            cells += [f"{n:,}", f"{w[mask].mean():.3f}" if n else "–", f"{a[mask].mean():.3f}" if n else "–"]
        lines.append(f"| {edges[b]:.2f}–{edges[b + 1]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: Sequence[ReplayResult]) -> str:
    """Mean accepted tokens per step: one row per drafter, one column per budget; best per column bold."""
    budgets = sorted({r.budget for r in results})
    names = list(dict.fromkeys(r.drafter for r in results))
    cell = {(r.drafter, r.budget): r.mean_accepted for r in results}
    best = {b: max(cell.get((n, b), 0.0) for n in names) for b in budgets}
    lines = [
        "| drafter | " + " | ".join(f"b={b}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name in names:
        cells = []
        for b in budgets:
            value = cell.get((name, b))
            text = "" if value is None else f"{value:.3f}"
            cells.append(f"**{text}**" if value is not None and value == best[b] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def select_tree_inputs(k: int = 5000, m: int = 10, vocab_size: int = 49152, seed: int = 0) -> dict:
    """Two k x m inputs for timing :func:`select_tree`: skewed (50 continuations, Zipf-distributed,
    each row diverging to random tokens with probability 0.15 per position, like a datastore's) and
    uniform random (every row distinct: the most nodes)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab_size, (50, m))
    skewed = base[np.minimum(rng.zipf(1.5, k) - 1, 49)]
    for j in range(m):
        diverge = rng.random(k) < 0.15
        skewed[diverge, j:] = rng.integers(0, vocab_size, (int(diverge.sum()), m - j))
    uniform = rng.integers(0, vocab_size, (k, m))
    return {"skewed": skewed.astype(np.int32), "uniform": uniform.astype(np.int32)}


def time_select_tree(budget: int = 64, calls: int = 500) -> list[tuple[str, float, float]]:
    """(input, wall ms per call, CPU ms per call) of restspec's select_tree."""
    from restspec.draft.trie import select_tree

    rows = []
    for name, cont in select_tree_inputs().items():
        select_tree(cont, budget)  # compile / warm up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            select_tree(cont, budget)
        wall = (time.perf_counter() - wall) / calls * 1e3
        cpu = (time.process_time() - cpu) / calls * 1e3
        rows.append((name, wall, cpu))
    return rows


if __name__ == "__main__":  # python -m benchmarks.simulate: time select_tree (k=5000, m=10, c=64)
    for name, wall, cpu in time_select_tree():
        print(f"{name:8s} select_tree wall {wall:7.3f} ms/call  cpu {cpu:7.3f} ms/call")
