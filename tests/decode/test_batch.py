"""Continuous batching: concurrent requests share each step's forward and each gets exactly what it
would get alone (greedy parity, the same seeded samples), with mixed lengths, mixed settings, requests
joining mid-run (their prompts prefilled in chunks), finishing, failing and being cancelled."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from conftest import ARCHS, VOCAB, IdTokenizer, OracleDrafter, gguf_model, plain_greedy, tiny_model

from restspec.decode import GenerationConfig, SpeculativeGenerator, blocks
from restspec.decode.backends import backend_by_name
from restspec.decode.budget import AdaptiveBudget, FixedBudget, LatencyCurve
from restspec.decode.config import SamplingConfig
from restspec.draft import ContextDrafter
from restspec.draft.base import StatelessDrafter
from restspec.draft.tree import DraftTree
from restspec.errors import GenerationError

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(0, VOCAB, size=n).tolist() for n in (5, 40, 9, 23, 70, 3)]
NEW_TOKENS = [20, 7, 16, 12, 9, 18]


class Widths:
    """Wraps a backend's ``forward_batch`` and records the segments of every call."""

    def __init__(self, backend) -> None:
        self.calls: list[list[tuple[int, bool]]] = []
        inner = backend.forward_batch

        def forward_batch(segments):
            self.calls.append([(seg.width, seg.logits) for seg in segments])
            return inner(segments)

        backend.forward_batch = forward_batch

    @property
    def most_requests(self) -> int:
        return max(sum(logits for _, logits in call) for call in self.calls)


def concurrently(calls: Sequence[Callable[[], object]]) -> list[object]:
    """Run the calls on threads that start together; their results in order (an error is re-raised)."""
    results: list[object] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as error:  # handed to the test thread
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def batched(arch: str, backend: str, max_batch: int = 4, budget=6, prefill_chunk: int = 8):
    model = gguf_model(arch) if backend == "direct-blocks" else tiny_model(arch)  # weights on a 4-bit grid
    gen = SpeculativeGenerator(
        model,
        IdTokenizer(),
        budget=budget,
        backend=backend_by_name(model, backend),
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
    )
    return model, gen


def oracle_requests(model, gen, prompts=PROMPTS, news=NEW_TOKENS, shape="mixed") -> list:
    """The prompts generated concurrently through ``gen``, each with an oracle drafter of the given
    tree shape; every output is checked against the prompt decoded alone (greedy). The results."""
    expected = [plain_greedy(model, p, n) for p, n in zip(prompts, news, strict=True)]
    calls = [
        lambda p=p, n=n, e=e: gen.generate(
            p, GenerationConfig(max_new_tokens=n), drafter=OracleDrafter(p + e, shape, VOCAB)
        )
        for p, n, e in zip(prompts, news, expected, strict=True)
    ]
    results = concurrently(calls)
    for result, want in zip(results, expected, strict=True):
        assert result.output_ids.tolist() == want
    return results


@pytest.mark.parametrize(
    ("arch", "backend"),
    [("llama", "direct"), ("llama", "model"), ("qwen2-hybrid", "model"), ("llama", "direct-blocks")],
)
def test_concurrent_greedy_requests_each_get_their_own_greedy_output(arch, backend):
    if backend == "direct-blocks" and blocks.kernel() is None:
        pytest.skip("no C compiler to build the block kernel")
    model, gen = batched(arch, backend)
    widths = Widths(gen.backend)
    results = oracle_requests(model, gen)
    assert widths.most_requests > 1  # requests did share forwards
    assert widths.most_requests <= 4  # and never more than max_batch of them
    # joining prompts were prefilled in chunks of at most prefill_chunk rows while others decoded
    mixed = [call for call in widths.calls if {logits for _, logits in call} == {True, False}]
    assert any(sum(w for w, logits in call if not logits) <= 8 for call in mixed)
    assert sum(len(r.steps) for r in results) > len(widths.calls)  # fewer forwards than steps


class TightRoom(FixedBudget):
    """Up to ``size`` nodes per tree, but a step may add only 2 inputs (nodes, prompt rows) to its roots."""

    def step_room(self, fixed_inputs: int) -> int:
        return 2


def test_the_step_bound_shortens_drafts_never_the_prompt_chunks():
    model, gen = batched("llama", "direct", max_batch=2, budget=TightRoom(4))
    widths = Widths(gen.backend)
    oracle_requests(model, gen)
    mixed = [call for call in widths.calls if {logits for _, logits in call} == {True, False}]
    rows = [sum(w for w, logits in call if not logits) for call in mixed]
    nodes = [sum(w - 1 for w, logits in call if logits) for call in mixed]
    # joining prompts advance by whole chunks (8 rows), as without drafts; drafts get what is left
    assert 8 in rows
    assert all(n <= max(2 - r, 0) for n, r in zip(nodes, rows, strict=True))
    alone = [call for call in widths.calls if all(logits for _, logits in call)]
    assert max(sum(w - 1 for w, _ in call) for call in alone) == 2  # no prompt: the room is the drafts'


class NoRoom(FixedBudget):
    """Up to ``size`` nodes per tree, but no step may add anything to its roots and prompt rows."""

    def step_room(self, fixed_inputs: int) -> int:
        return 0


@pytest.mark.parametrize(("policy", "drafts"), [(NoRoom(4), False), (TightRoom(4), True)])
def test_a_step_without_room_for_drafts_drafts_nothing(policy, drafts, monkeypatch):
    proposed = []
    propose = OracleDrafter.propose

    def counting(self, context, budget):
        proposed.append(budget)
        return propose(self, context, budget)

    monkeypatch.setattr(OracleDrafter, "propose", counting)
    model, gen = batched("llama", "direct", max_batch=2, budget=policy)
    widths = Widths(gen.backend)
    oracle_requests(model, gen, PROMPTS[:3], NEW_TOKENS[:3])  # outputs as alone either way
    assert bool(proposed) is drafts
    assert any(w > 1 for call in widths.calls for w, logits in call if logits) is drafts


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("gpt2",)])
def test_batched_parity_across_architectures(arch):
    model, gen = batched(arch, "model", max_batch=3, budget=4)
    oracle_requests(model, gen, PROMPTS[:3], NEW_TOKENS[:3], shape="fan")


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    _, gen = batched("llama", "direct")
    settings = [
        GenerationConfig(max_new_tokens=14, sampling=SamplingConfig(temperature=0.9, top_p=0.9, seed=s))
        for s in range(3)
    ] + [GenerationConfig(max_new_tokens=10)]  # one greedy request among the sampled ones
    prompts = PROMPTS[:4]
    drafter = ContextDrafter()
    alone = [
        gen.generate(p, c, drafter=drafter).output_ids.tolist()
        for p, c in zip(prompts, settings, strict=True)
    ]
    calls = [
        lambda p=p, c=c: gen.generate(p, c, drafter=drafter) for p, c in zip(prompts, settings, strict=True)
    ]
    together = [r.output_ids.tolist() for r in concurrently(calls)]
    assert together == alone


def test_max_batch_one_runs_requests_one_after_the_other():
    _, gen = batched("llama", "direct", max_batch=1)
    widths = Widths(gen.backend)
    calls = [lambda p=p: gen.generate(p, GenerationConfig(max_new_tokens=6)) for p in PROMPTS[:3]]
    results = concurrently(calls)
    assert widths.most_requests == 1
    first, *later = sorted(results, key=lambda r: r.queued_s)
    assert all(r.queued_s >= 0.5 * (first.elapsed_s - first.queued_s) for r in later)  # waited their turn


class Failing(StatelessDrafter):
    """Proposes a token the model does not have (a datastore of another tokenizer)."""

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return DraftTree.chain([VOCAB + 5])


def test_a_failing_request_fails_alone():
    model, gen = batched("llama", "direct")
    expected = plain_greedy(model, PROMPTS[0], 12)
    calls = [
        lambda: gen.generate(PROMPTS[0], GenerationConfig(max_new_tokens=12)),
        lambda: gen.generate(PROMPTS[2], GenerationConfig(max_new_tokens=12), drafter=Failing()),
    ]
    good, bad = concurrently(calls)
    assert good.output_ids.tolist() == expected
    assert isinstance(bad, GenerationError) and "another tokenizer" in str(bad)


class Lifecycle(StatelessDrafter):
    def __init__(self) -> None:
        self.open: set[int] = set()

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        self.open.add(request)

    def stop_request(self, request: int = 0) -> None:
        self.open.remove(request)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        return DraftTree.empty()


def test_a_cancelled_stream_leaves_the_batch_and_the_others_finish():
    model, gen = batched("llama", "direct")
    drafter = Lifecycle()
    expected = plain_greedy(model, PROMPTS[1], 20)

    def stop_after_two() -> int:
        chunks = gen.stream(PROMPTS[0], GenerationConfig(max_new_tokens=50), drafter=drafter)
        for _ in range(2):
            next(chunks)
        chunks.close()
        return len(drafter.open)

    def whole():
        return gen.generate(PROMPTS[1], GenerationConfig(max_new_tokens=20), drafter=drafter)

    _, result = concurrently([stop_after_two, whole])
    assert result.output_ids.tolist() == expected
    assert drafter.open == set()  # every request the drafter saw start has stopped


def test_the_joint_budget_shrinks_speculation_as_the_batch_grows():
    curve = LatencyCurve((1, 8, 16, 64), (0.010, 0.012, 0.016, 0.050))
    policy = AdaptiveBudget(curve, max_budget=8, learn_costs=False)
    tree = DraftTree.chain(list(range(8)), [0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05])
    alone = policy.choose_batch([tree])
    assert alone == [policy.choose(tree, 10)]
    totals = [sum(policy.choose_batch([tree] * n)) / n for n in (1, 4, 16)]
    assert totals[0] >= totals[1] >= totals[2] and totals[0] > totals[2]
    # a likelier tree gets its nodes first
    strong = DraftTree.chain(list(range(8)), [0.95] * 8)
    sizes = policy.choose_batch([tree, strong] * 4)
    assert sizes[1] >= sizes[0]


def test_a_batch_step_stays_within_the_step_time_the_policy_allows():
    curve = LatencyCurve((1, 8, 16, 64), (0.010, 0.012, 0.016, 0.050))
    policy = AdaptiveBudget(curve, max_budget=8, learn_costs=False)
    # a lone request's longest step: 9 inputs, 12.5 ms; 1.5x that = 18.75 ms: 19 inputs (18.5 ms)
    assert policy.step_room(1) == 18
    assert policy.step_room(8) == 11
    assert policy.step_room(30) == 0
    sure = DraftTree.chain(list(range(8)), [0.99] * 8)
    assert sum(policy.choose_batch([sure] * 8)) > 11  # sure nodes pay for themselves ...
    sizes = policy.choose_batch([sure] * 8, 8, policy.step_room(8))
    assert sum(sizes) == 11 and max(sizes) - min(sizes) <= 1  # ... but the step's bound comes first
    assert FixedBudget(3).choose_batch([sure] * 4, 4, 5) == [2, 1, 1, 1]
    assert FixedBudget(3).step_room(4) is None


@pytest.mark.parametrize(("factor", "room"), [(1.0, (8, 1)), (1.1, (10, 3)), (1.5, (18, 11))])
def test_a_lower_step_factor_bounds_a_batch_step_tighter(factor, room):
    curve = LatencyCurve((1, 8, 16, 64), (0.010, 0.012, 0.016, 0.050))
    policy = AdaptiveBudget(curve, max_budget=8, learn_costs=False, step_factor=factor)
    # a lone request's longest step: 9 inputs, 12.5 ms; 1.0x: 9 inputs, 1.1x (13.75 ms): 11 inputs
    assert (policy.step_room(1), policy.step_room(8)) == room
    assert policy.fresh().step_factor == factor
    with pytest.raises(ValueError, match=r"step_factor=0\.9 must be >= 1"):
        AdaptiveBudget(curve, step_factor=0.9)
