"""restspec's speculator for vLLM 0.34+, against vLLM 0.34's own code, on CPU tensors.

Needs the vLLM 0.34 unit-test environment (``.ci/vllm034-env``: PyPI's vllm 0.34.0 without its CUDA
dependencies); elsewhere (no vLLM, or vLLM 0.32/0.33) the module is skipped. vLLM's registry resolves
the method from restspec's entry point, vLLM's ``SpeculativeConfig`` checks the options and vLLM's
``init_speculator`` builds the speculator over a real ``RequestState``. :class:`Runner` stands in for
the GPU model runner: it writes the request states the way its Triton kernels do (prompt rows, then
each step's sampled tokens and lengths) and calls the speculator's hooks with the tensors vLLM passes
(``InputBatch.idx_mapping``, ``num_sampled`` / ``num_rejected`` int32[num_reqs]), verifying each
draft the way vLLM does: accepted while it matches the model's tokens, then the model's own token."""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from restspec.datastore import Datastore
from restspec.datastore.fingerprint import tokenizer_fingerprint
from restspec.integrations.vllm import ProposerConfigError
from restspec_vllm_plugin import METHOD

pytest.importorskip("vllm", reason="vLLM is not installed: build its 0.34 environment with .ci/vllm034-env")
speculator_config = pytest.importorskip(
    "vllm.v1.worker.gpu.spec_decode.speculator_config", reason="vLLM < 0.34 has no speculator registry"
)

K = 4
MAX_LEN = 64
MAX_REQS = 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vllm_on_cpu():
    """vLLM's CPU platform, and request-state buffers in plain host memory: the CPU torch cannot pin
    memory, which vLLM's CPU platform assumes for its UVA buffers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_TARGET_DEVICE", "cpu")
        from vllm.v1.worker.gpu import buffer_utils

        patch.setattr(buffer_utils, "is_uva_available", lambda: False)
        yield


@pytest.fixture(scope="module")
def registered(vllm_on_cpu):
    """The method, registered the way vLLM does in every process: its general plugins."""
    from vllm.plugins import load_general_plugins

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("restspec") == "restspec_vllm_plugin:register", (
        "restspec's entry point is not installed here: install restspec into this environment "
        "(.ci/vllm034-env does)"
    )
    load_general_plugins()
    assert METHOD in speculator_config.registered_speculative_methods()


@pytest.fixture(scope="module")
def model_config(registered, model_folder):
    from vllm.config import ModelConfig

    return ModelConfig(model=model_folder, dtype="float32", max_model_len=MAX_LEN, skip_tokenizer_init=True)


def speculative_config(model_config, **fields):
    from vllm.config import ParallelConfig, SpeculativeConfig

    return SpeculativeConfig(
        method=METHOD,
        num_speculative_tokens=K,
        target_model_config=model_config,
        target_parallel_config=ParallelConfig(),
        **fields,
    )


class Runner:
    """vLLM 0.34's GPU model runner as far as a speculator sees it (see the module)."""

    def __init__(self, model_config, options: dict) -> None:
        from vllm.config import SchedulerConfig
        from vllm.v1.worker.gpu.spec_decode import init_speculator
        from vllm.v1.worker.gpu.states import RequestState

        spec = speculative_config(model_config, speculator_options=options)
        scheduler = SchedulerConfig(max_num_seqs=MAX_REQS, max_model_len=MAX_LEN, is_encoder_decoder=False)
        # VllmConfig itself needs Triton on CPUs; these are the parts a speculator reads
        config = SimpleNamespace(
            speculative_config=spec, model_config=model_config, scheduler_config=scheduler
        )
        self.states = RequestState(MAX_REQS, MAX_LEN, MAX_LEN, K, model_config.get_vocab_size(), CPU)
        self.speculator = init_speculator(config, CPU, self.states)
        self.drafts: dict[str, list[int]] = {}  # by request: the drafts its next step verifies

    def add(self, req_id: str, prompt: list[int]) -> None:
        states = self.states
        states.add_request(req_id, len(prompt), prompt, num_computed_tokens=0, max_tokens=MAX_LEN)
        slot = states.req_id_to_index[req_id]
        # what apply_staged_writes' Triton kernel writes
        states.all_token_ids.clear_staged_writes()
        states.total_len.clear_staged_writes()
        states.all_token_ids.gpu[slot, : len(prompt)] = torch.tensor(prompt, dtype=torch.int32)
        states.total_len.gpu[slot] = len(prompt)
        self.speculator.add_request(slot)
        self.drafts[req_id] = []

    def finish(self, *req_ids: str) -> None:
        self.speculator.on_requests_finished(set(req_ids))
        for req_id in req_ids:
            self.states.remove_request(req_id)
            del self.drafts[req_id]

    def step(
        self, model: dict[str, list[int]], width: int | None = None, admitted: int | None = None
    ) -> dict[str, list[int]]:
        """One step over the requests in ``model``: each one's model would say these tokens next (an
        empty list: a prefill chunk). Its pending drafts (their first ``admitted``, as vLLM's adaptive
        verification may cut them) are verified against them; the speculator proposes the next ones
        (the first ``width`` columns, all K by default)."""
        from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

        states, req_ids = self.states, list(model)
        slots = [states.req_id_to_index[r] for r in req_ids]
        sampled, rejected = [], []
        for req_id, slot in zip(req_ids, slots, strict=True):
            truth, draft = model[req_id], self.drafts[req_id][:admitted]
            accepted = 0  # vLLM accepts drafts while they match the model's tokens, then takes its own
            while accepted < min(len(draft), len(truth) - 1) and draft[accepted] == truth[accepted]:
                accepted += 1
            tokens = truth[: accepted + 1] if truth else []
            total = int(states.total_len.gpu[slot])  # what post_update's Triton kernel writes
            states.all_token_ids.gpu[slot, total : total + len(tokens)] = torch.tensor(tokens).int()
            states.total_len.gpu[slot] = total + len(tokens)
            sampled.append(len(tokens))
            rejected.append(len(draft) - accepted if tokens else 0)
        dummy = InputBatch.make_dummy(len(req_ids), len(req_ids), InputBuffers(MAX_REQS, MAX_LEN, CPU))
        batch = dataclasses.replace(
            dummy,
            req_ids=req_ids,
            idx_mapping=torch.tensor(slots, dtype=torch.int32),
            idx_mapping_np=np.asarray(slots, np.int32),
        )
        drafts = self.speculator.propose(
            batch,
            {},
            {},
            torch.empty(0),
            None,
            torch.tensor(sampled, dtype=torch.int32),
            torch.tensor(rejected, dtype=torch.int32),
            states.last_sampled_tokens,
            states.next_prefill_tokens,
            torch.zeros(MAX_REQS),
            torch.zeros(MAX_REQS, dtype=torch.int64),
            num_speculative_tokens=width,
        )
        assert drafts.shape == (len(req_ids), K) and drafts.dtype == torch.int64 and drafts.device == CPU
        width = K if width is None else width
        for req_id, row, n in zip(req_ids, drafts.tolist(), sampled, strict=True):
            self.drafts[req_id] = row[:width] if n else []
        return {req_id: row for req_id, row in zip(req_ids, drafts.tolist(), strict=True)}


def confidences(runner: Runner, rows: int) -> list[list[float]]:
    probs = runner.speculator.draft_token_confidence_probs[:rows].tolist()
    return [[round(p, 3) for p in row] for row in probs]


def test_vllm_resolves_the_method_and_checks_its_options(model_config, monkeypatch):
    from restspec.integrations.vllm_speculator import RestspecSpeculator
    from restspec.integrations.vllm_speculator_config import RestspecSpeculatorConfig

    spec = speculative_config(model_config, speculator_options={"history_tokens": 100})
    assert spec.custom_method == METHOD and spec.method is None  # based on no built-in method
    assert isinstance(spec.speculator_config, RestspecSpeculatorConfig)
    assert isinstance(Runner(model_config, {}).speculator, RestspecSpeculator)
    with pytest.raises(ProposerConfigError, match=r"speculator_options has unknown keys \['datastore'\]"):
        speculative_config(model_config, speculator_options={"datastore": "/data/ds"})
    # without speculator_options, the file RESTSPEC_VLLM_CONFIG names (checked as the config is built)
    monkeypatch.setenv("RESTSPEC_VLLM_CONFIG", "/nonexistent/restspec.json")
    with pytest.raises(ProposerConfigError, match="cannot read the proposer config"):
        speculative_config(model_config)


def test_drafts_come_from_the_datastore_and_the_context_padded_like_ngram(
    model_config, model_folder, tmp_path
):
    from restspec.models import load_tokenizer

    tokenizer = load_tokenizer(model_folder)
    store = Datastore.build_from_tokens(
        [[30, 31, 32, 33, 34, 35, 36, 37]],
        tmp_path / "ds",
        vocab_size=len(tokenizer),
        fingerprint=tokenizer_fingerprint(tokenizer),
    )
    runner = Runner(model_config, {"datastores": [str(store.path)]})
    runner.add("a", [1, 30, 31])
    runner.add("b", [5, 6, 7, 8, 9, 5, 6])
    runner.add("c", [2, 2, 2, 2, 2])
    # a: only the datastore has seen 30 31 32; b: its context has seen 5 6 7 before; c: a prefill
    # chunk (nothing sampled), which vLLM gives no drafts to: its row holds the filler
    drafts = runner.step({"a": [32], "b": [7], "c": []})
    assert drafts["a"] == [33, 34, 35, 36]
    assert drafts["b"] == [8, 9, 5, 6]
    assert drafts["c"] == [2, 2, 2, 2]
    stats = runner.speculator.stats
    assert stats.requests_started == 2 and stats.drafted_tokens == 8
    assert stats.source_matches["datastore"] == 1 and stats.source_matches["context"] == 1
    # vLLM's adaptive verification reads each token's acceptance given its parent (0: a filler)
    conf = confidences(runner, 3)
    assert all(0 < p <= 1 for p in conf[0] + conf[1]) and conf[2] == [0.0] * K


def test_paths_shorter_than_the_width_end_in_the_fillers_and_accepted_tokens_are_learned(model_config):
    runner = Runner(model_config, {})
    runner.add("a", [5, 6, 7, 8, 5, 6])
    # the context has seen 5 6 7 8 once: the path after "5 6 7" is 8 5 6 7 8 ..., the filler is the
    # row's last token (vLLM's ngram speculator pads with the last sampled token)
    assert runner.step({"a": [7]}) == {"a": [8, 5, 6, 7]}
    # the model agrees on 8 5, then says 9: vLLM accepted 2 of 4 drafts and rejected the other 2
    runner.step({"a": [8, 5, 9]})
    stats = runner.speculator.stats
    assert stats.accepted_tokens == 2 and stats.drafted_tokens >= 4
    # a path that runs out before K: "5 9" was never followed by anything, "9" neither
    runner.add("b", [40, 41, 42])
    drafts = runner.step({"a": [1], "b": [43]})
    assert drafts["b"] == [43] * K  # nothing matched: all fillers
    assert confidences(runner, 2)[1] == [0.0] * K


def test_vllm_schedules_the_width_and_no_drafts_at_all(model_config):
    runner = Runner(model_config, {})
    runner.add("a", [5, 6, 7, 8, 9, 5, 6])
    # a width below K (vLLM's num_speculative_tokens_per_batch_size): only that many are drafted
    assert runner.step({"a": [7]}, width=2)["a"][:2] == [8, 9]
    assert runner.speculator.stats.drafted_tokens == 2
    # width 0 (no drafts this step): nothing is drafted, but the step is still learned from
    runner.step({"a": [8, 9, 5]}, width=0)
    stats = runner.speculator.stats
    assert stats.steps_not_drafted == 1 and stats.drafted_tokens == 2 and stats.accepted_tokens == 2


def test_only_the_drafts_vllm_verified_are_learned_from(model_config):
    def calibration_after(width: int, admitted: int | None, model: list[int]) -> dict:
        runner = Runner(model_config, {})
        runner.add("a", [5, 6, 7, 8, 9, 5, 6])
        assert runner.step({"a": [7]}, width=width)["a"][:width] == [8, 9, 5, 6][:width]
        runner.step({"a": model}, admitted=admitted)
        return runner.speculator.drafting.calibration.state_dict()

    # the model accepts 8 and rejects 9: verifying all 4 drafts teaches that depths 2-4 failed;
    # verifying the first only (vLLM's adaptive verification admitted 1) teaches what a 1-token chain does
    all_four = calibration_after(4, None, [8, 1])
    first_only = calibration_after(4, 1, [8, 1])
    one_token = calibration_after(1, None, [8, 1])
    np.testing.assert_array_equal(first_only["xtx"], one_token["xtx"])
    assert not np.array_equal(first_only["xtx"], all_four["xtx"])


def test_finished_and_preempted_outputs_join_the_history_and_the_warmup_is_forgotten(model_config):
    runner = Runner(model_config, {})
    runner.add("a", [1, 2, 3])
    runner.add("b", [50, 51])
    runner.step({"a": [20], "b": [52]})
    runner.step({"a": [21], "b": [53]})
    runner.step({"a": [22], "b": [54]})
    runner.finish("a")
    speculator = runner.speculator
    assert speculator.stats.requests_finished == 1
    assert speculator.drafting.history.num_tokens == 3  # 20 21 22: its output, not its prompt
    # a new request whose context ends like the finished output: only the history knows what follows
    runner.add("c", [9, 9, 20])
    assert runner.step({"b": [55], "c": [21]})["c"][0] == 22
    assert speculator.stats.source_matches["history"] >= 1
    # b is preempted (its slot freed without on_requests_finished); the next request in the slot ends it
    slot = runner.states.req_id_to_index["b"]
    runner.states.remove_request("b")
    runner.add("d", [60, 61])
    assert runner.states.req_id_to_index["d"] == slot
    assert speculator.stats.requests_finished == 2
    assert speculator.drafting.history.num_tokens == 3 + 4  # 52 53 54 55
    # vLLM's warm-up requests end with reset_state: nothing learned from them remains
    speculator.reset_state()
    assert speculator.drafting.history.num_tokens == 0 and speculator.stats.requests_started == 0
