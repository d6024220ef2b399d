"""The vLLM proposer's bookkeeping, driven the way vLLM 0.32 drives it (numpy arrays, no vLLM needed).

vLLM calls ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`` after every step: row i
of ``token_ids_cpu`` holds request i's tokens, this step's sampled tokens included."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from restspec.datastore import Datastore
from restspec.datastore.fingerprint import tokenizer_fingerprint
from restspec.draft.tree import DraftTree
from restspec.errors import DatastoreError
from restspec.integrations.vllm import (
    ProposerConfig,
    ProposerConfigError,
    RestspecProposer,
    best_path,
)

MAX_LEN = 512


def vllm_config(k: int = 4, tokenizer: str = "unused") -> SimpleNamespace:
    """The two corners of vLLM's VllmConfig that the proposer reads."""
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=MAX_LEN, tokenizer=tokenizer),
    )


class Batch:
    """vLLM's persistent batch: rows of token ids; ``step`` appends sampled tokens and calls propose."""

    def __init__(self, proposer: RestspecProposer) -> None:
        self.proposer = proposer
        self.tokens = np.zeros((8, MAX_LEN), np.int32)
        self.lengths = np.zeros(8, np.int32)
        self.rows = 0

    def add(self, prompt: list[int]) -> int:
        row = self.rows
        self.tokens[row, : len(prompt)] = prompt
        self.lengths[row] = len(prompt)
        self.rows += 1
        return row

    def remove(self, row: int) -> None:
        """The request in ``row`` finished: the last row moves into its place (vLLM's condense)."""
        last = self.rows - 1
        self.tokens[row], self.lengths[row] = self.tokens[last], self.lengths[last]
        self.tokens[last], self.lengths[last] = 0, 0
        self.rows -= 1

    def step(self, sampled: list[list[int]]) -> list[list[int]]:
        assert len(sampled) == self.rows
        for row, tokens in enumerate(sampled):
            n = self.lengths[row]
            self.tokens[row, n : n + len(tokens)] = tokens
            self.lengths[row] += len(tokens)
        return self.proposer.propose(sampled, self.lengths.copy(), self.tokens)


def test_best_path_follows_the_most_probable_child():
    # root ─ 7 (0.9) ─ 8 (0.5) ─ 9 (0.2)      nodes in rank order, parents first
    #      └ 3 (0.6) ─ 4 (0.55)               the path goes 7 → 8 → 9 although 3 and 4 rank above 8
    tree = DraftTree([7, 3, 4, 8, 9], [-1, -1, 1, 0, 3], [0.9, 0.6, 0.55, 0.5, 0.2])
    tokens, probs = best_path(tree)
    assert tokens.tolist() == [7, 8, 9]
    np.testing.assert_allclose(probs, [0.9, 0.5, 0.2], rtol=1e-6)
    assert best_path(DraftTree.empty())[0].size == 0


def test_a_request_drafts_from_its_own_context_and_learns_what_was_accepted():
    proposer = RestspecProposer(vllm_config(k=4), ProposerConfig(knee_tokens=64))
    batch = Batch(proposer)
    batch.add([5, 6, 7, 8, 9, 5, 6])
    # prefill sampled 7: the context ends in 5 6 7, which was followed by 8 9 5 6 before
    assert batch.step([[7]]) == [[8, 9, 5, 6]]
    # vLLM accepted 8 9 and sampled 11 instead of 5
    drafts = batch.step([[8, 9, 11]])
    assert proposer.stats.accepted_tokens == 2
    assert proposer.stats.drafted_tokens == 4 + len(drafts[0])
    assert proposer.stats.requests_started == 1
    assert proposer.stats.source_matches["context"] >= 1


def test_requests_that_move_stay_known_and_finished_outputs_join_the_history():
    proposer = RestspecProposer(vllm_config(k=3), ProposerConfig(knee_tokens=64))
    batch = Batch(proposer)
    batch.add([1, 2, 3])
    batch.add([40, 41, 42])
    batch.step([[20], [43]])
    batch.step([[21, 22], [44]])  # whatever was drafted: vLLM's sampled tokens are the truth
    batch.step([[23], [45]])
    assert proposer.stats.requests_started == 2
    batch.remove(0)  # the first request finished; the second moves to row 0
    batch.step([[46]])
    assert proposer.stats.requests_started == 2  # recognised in its new row
    assert proposer.stats.requests_finished == 1
    assert proposer.history.num_tokens == 4  # 20 21 22 23: its output, not its prompt
    # a new request whose context ends like the finished output: only the history knows what follows
    row = batch.add([9, 9, 20, 21])
    drafts = batch.step([[47], [22]])
    assert proposer.stats.requests_started == 3
    assert drafts[row] == [23]
    assert proposer.stats.source_matches["history"] == 1


def test_rows_not_decoded_keep_their_chain_and_prefill_chunks_get_none():
    proposer = RestspecProposer(vllm_config(k=4), ProposerConfig(knee_tokens=64))
    batch = Batch(proposer)
    batch.add([5, 6, 7, 8, 9, 5, 6])
    first = batch.step([[7]])
    batch.add([3, 3, 3, 3])  # a prefill chunk: in the batch, nothing sampled yet
    assert batch.step([[], []]) == [first[0], []]
    assert proposer.stats.requests_started == 1


def test_a_large_batch_drafts_nothing():
    proposer = RestspecProposer(vllm_config(k=4), ProposerConfig(knee_tokens=2))
    batch = Batch(proposer)
    for r in range(8):
        batch.add([r + 1, 7, 8, r + 1, 7])
    assert batch.step([[8]] * 8) == [[]] * 8  # each would copy "r+1 7 8 ...", but 8 rows > knee 2


class Clock:
    """A clock the test moves: ``advance`` stands for vLLM's step between two ``propose`` calls."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_priced_steps(draft_s: float, steps: int = 60, learn_step_cost: bool = True) -> RestspecProposer:
    """Four requests whose "model" continues ``1 2 3 4 5`` but says 6 instead one time in four (so
    drafts are sometimes wrong and the chains vary), on a machine where a step costs 10 ms + 1 ms a
    row + ``draft_s`` a draft token."""
    clock = Clock()
    config = ProposerConfig(knee_tokens=16, learn_step_cost=learn_step_cost)
    proposer = RestspecProposer(vllm_config(k=4), config, clock=clock)
    batch = Batch(proposer)
    for _ in range(4):
        batch.add([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1])
    rng = np.random.default_rng(0)
    drafts: list[list[int]] = [[] for _ in range(4)]
    for _ in range(steps):
        sampled = []
        for row, draft in enumerate(drafts):
            last = int(batch.tokens[row, batch.lengths[row] - 1])
            tokens: list[int] = []
            for j in range(len(draft) + 1):  # vLLM: the accepted draft tokens, then the model's own
                last = 6 if rng.random() < 0.25 else last % 5 + 1
                tokens.append(last)
                if j == len(draft) or draft[j] != last:
                    break
            sampled.append(tokens)
        clock.now += 0.010 + 0.001 * 4 + draft_s * sum(len(d) for d in drafts)
        drafts = batch.step(sampled)
    return proposer


def test_the_step_cost_is_learned_from_the_time_between_calls():
    cheap = run_priced_steps(draft_s=0.0001)
    _, per_row, per_draft = cheap.step_cost.coefficients
    assert per_draft < per_row  # learned: a draft token costs a tenth of a row here
    assert cheap.stats.drafted_tokens > 4 * 60  # cheap: drafts all along
    assert cheap.stats.steps_not_drafted == 0
    # a draft token costing five of the step's fixed cost can never pay: once the proposer has
    # learned that, it stops drafting, and stops calling the drafters too
    dear = run_priced_steps(draft_s=0.050)
    assert dear.stats.steps_not_drafted > 30
    assert dear.stats.drafted_tokens < 4 * 4 * 20
    # unless told to price every step by the prior alone
    fixed = run_priced_steps(draft_s=0.050, learn_step_cost=False)
    assert fixed.stats.steps_not_drafted == 0
    assert fixed.stats.drafted_tokens > 4 * 60


def test_the_datastore_drafts_and_its_tokenizer_is_checked(tmp_path, model_folder):
    from restspec.models import load_tokenizer

    tokenizer = load_tokenizer(model_folder)
    store = Datastore.build_from_tokens(
        [[30, 31, 32, 33, 34, 35]],
        tmp_path / "ds",
        vocab_size=len(tokenizer),
        fingerprint=tokenizer_fingerprint(tokenizer),
    )
    config = ProposerConfig(datastores=(str(store.path),), knee_tokens=64)
    proposer = RestspecProposer(vllm_config(k=3, tokenizer=model_folder), config)
    batch = Batch(proposer)
    batch.add([1, 30, 31])
    # only the datastore has seen 30 31 32 before (the third token of its path, squared by the
    # acceptance calibration's prior, is not worth its price)
    assert batch.step([[32]]) == [[33, 34]]
    assert proposer.stats.source_matches["datastore"] == 1

    other = Datastore.build_from_tokens(
        [[1, 2, 3]], tmp_path / "other", vocab_size=len(tokenizer), fingerprint="0123456789abcdef"
    )
    with pytest.raises(DatastoreError, match="was built with tokenizer 0123456789abcdef"):
        RestspecProposer(vllm_config(tokenizer=model_folder), ProposerConfig(datastores=(str(other.path),)))


def test_config_files(tmp_path, monkeypatch):
    path = tmp_path / "restspec.json"
    path.write_text(json.dumps({"datastores": ["/data/ds"], "knee_tokens": 16}))
    monkeypatch.setenv("RESTSPEC_VLLM_CONFIG", str(path))
    assert ProposerConfig.from_env() == ProposerConfig(datastores=("/data/ds",), knee_tokens=16)
    toml = tmp_path / "restspec.toml"
    toml.write_text('datastores = ["/data/ds"]\nhistory_tokens = 1000\n')
    assert ProposerConfig.from_file(toml).history_tokens == 1000
    path.write_text(json.dumps({"datastore": "/data/ds"}))
    with pytest.raises(ProposerConfigError, match=r"unknown keys \['datastore'\]"):
        ProposerConfig.from_env()
    with pytest.raises(ProposerConfigError, match="knee_tokens=0 must be > 0"):
        ProposerConfig(knee_tokens=0)
    monkeypatch.setenv("RESTSPEC_VLLM_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(ProposerConfigError, match="cannot read the proposer config"):
        ProposerConfig.from_env()
