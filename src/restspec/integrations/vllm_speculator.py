"""restspec's drafter as vLLM 0.34+'s speculative method ``"restspec"`` (a ``BaseSpeculator`` of vLLM's
GPU model runner).

Use::

    vllm serve MODEL --speculative-config '{"method": "restspec", "num_speculative_tokens": 8,
        "speculator_options": {"datastores": ["/data/ds"]}}'

(``speculator_options``: the fields of :class:`~restspec.integrations.vllm.ProposerConfig`; without
it, the file ``RESTSPEC_VLLM_CONFIG`` names). The ``vllm.general_plugins`` entry point
(:mod:`restspec_vllm_plugin`) registers the method in every vLLM process.

vLLM builds ``RestspecSpeculator(vllm_config, device, req_states)`` in each worker and calls

- ``add_request(slot)`` when a request takes a request-state slot (a request that held the slot
  before without finishing was preempted: it ends here);
- ``propose(input_batch, ..., num_sampled, num_rejected, ...)`` after every step, once the step's
  sampled tokens are in ``req_states.all_token_ids`` (int32[max_num_reqs, max_model_len], by slot,
  ``req_states.total_len`` long); batch row ``b`` is slot ``input_batch.idx_mapping[b]``, to which the
  step added ``num_sampled[b]`` tokens (accepted drafts + the model's own; 0 for a prefill chunk)
  after rejecting ``num_rejected[b]`` draft tokens;
- ``on_requests_finished(req_ids)`` before the finished requests' slots are freed.

Each step the rows' new tokens come to the host in one copy (a request's first step copies its whole
row), feed the request's drafter, and the drafts of :class:`~restspec.integrations.vllm.BatchDrafting`
(shared with the 0.32 proposer) go back as an int64[num_reqs, K] tensor on the inputs' device.

vLLM 0.34 verifies every draft slot of every decoded request: the width is one number per step
(``num_speculative_tokens``, or per batch size with ``num_speculative_tokens_per_batch_size``), and a
slot without a draft is verified all the same. So each request gets its whole best path up to that
width; slots past it hold the row's last token, the filler of vLLM's own ``ngram`` speculator (verified
and almost always rejected). restspec's batch-priced chain lengths (0.32) have no place here: a
shorter chain saves nothing. What can save verification is vLLM's adaptive verification
(``"enable_adaptive_verification": true``), which trims slots by the per-slot confidences this
speculator publishes (the calibrated probability of each path token given its parent, 0 for
fillers).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.v1.worker.gpu.spec_decode.speculator import BaseSpeculator

from restspec.integrations.vllm import BatchDrafting, ProposerStats, Request
from restspec.integrations.vllm_speculator_config import proposer_config

if TYPE_CHECKING:
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.states import RequestState


class SlotTokens:
    """A live request's tokens mirrored on the host, appended to in place (amortized doubling), so a
    step copies only its new tokens; views handed out stay valid, as nothing below ``length`` is
    written again."""

    def __init__(self, tokens: np.ndarray) -> None:
        self._buffer = np.array(tokens, np.int32)
        self.length = len(self._buffer)

    def extend(self, tokens: np.ndarray) -> None:
        end = self.length + len(tokens)
        if end > len(self._buffer):
            grown = np.zeros(max(end, 2 * len(self._buffer)), np.int32)
            grown[: self.length] = self._buffer[: self.length]
            self._buffer = grown
        self._buffer[self.length : end] = tokens
        self.length = end

    def view(self) -> np.ndarray:
        """The tokens so far: a read-only int32[length] view."""
        view = self._buffer[: self.length]
        view.flags.writeable = False
        return view


@dataclass
class SlotRequest:
    """The request in one request-state slot: restspec's record of it and its tokens."""

    request: Request
    tokens: SlotTokens


@dataclass(frozen=True)
class StepRows:
    """What one step did to the batch's rows, read from the device in one copy (all int64, host)."""

    sampled: np.ndarray
    """[num_reqs]: tokens the step added to the row (0: a prefill chunk)."""
    rejected: np.ndarray
    """[num_reqs]: draft tokens the step rejected."""
    total: np.ndarray
    """[num_reqs]: the row's tokens now."""
    tail: np.ndarray
    """[num_reqs, K + 1]: the row's last K + 1 tokens (its first token repeated where it is shorter)."""


def conditional(accept: np.ndarray) -> np.ndarray:
    """Per-token acceptance given the parent from acceptance up to each depth (float[d], non-increasing):
    what vLLM's adaptive verification multiplies back into a path's survival."""
    parents = np.concatenate(([1.0], accept[:-1]))
    return np.divide(accept, parents, out=np.zeros_like(accept), where=parents > 0)


class RestspecSpeculator(BaseSpeculator):
    """restspec's drafter for vLLM 0.34+'s speculative method ``"restspec"`` (see the module)."""

    def __init__(
        self,
        vllm_config: Any,
        device: torch.device,
        req_states: RequestState,
    ) -> None:
        spec = vllm_config.speculative_config
        self.req_states = req_states
        self.device = device
        self.num_speculative_steps = int(spec.num_speculative_tokens)
        self.drafting = BatchDrafting(
            proposer_config(spec),
            self.num_speculative_steps,
            vllm_config.model_config.max_model_len,
            vllm_config.model_config.tokenizer,
        )
        self.enable_adaptive_verification = bool(spec.enable_adaptive_verification)
        """Read by vLLM's model runner: trim draft slots by :attr:`draft_token_confidence_probs`."""
        shape = (vllm_config.scheduler_config.max_num_seqs, self.num_speculative_steps)
        self.drafts = torch.zeros(shape, dtype=torch.int64, device=device)
        """int64[max_num_reqs, K]: the drafts by batch row; ``propose`` returns its first rows."""
        self.draft_token_confidence_probs = torch.zeros(shape, dtype=torch.float32, device=device)
        """float32[max_num_reqs, K] by batch row: each draft token's calibrated acceptance given its
        parent, 0 for fillers (read by vLLM's adaptive verification)."""
        self._slots: dict[int, SlotRequest] = {}
        self._window = torch.arange(self.num_speculative_steps + 1, device=device)

    @property
    def stats(self) -> ProposerStats:
        return self.drafting.stats

    def init_cudagraph_manager(self, cudagraph_mode: Any) -> None:
        """Nothing to capture: drafting runs on the host."""

    def capture(self) -> None:
        """Nothing to capture: drafting runs on the host."""

    def add_request(self, req_index: int) -> None:
        # a request that held the slot without finishing was preempted; its output so far is as good a
        # source as a finished one (when it resumes, it is a new request to restspec)
        self._end(req_index)

    def on_requests_finished(self, finished_req_ids: Iterable[str]) -> None:
        for req_id in sorted(finished_req_ids):  # sorted: every tensor-parallel rank learns alike
            slot = self.req_states.req_id_to_index.get(req_id)
            if slot is not None:
                self._end(slot)

    def _end(self, slot: int) -> None:
        ended = self._slots.pop(slot, None)
        if ended is not None:
            self.drafting.finish(ended.request)

    def reset_state(self) -> None:
        """vLLM's warm-up requests are over: forget their outputs, the calibration and the counters."""
        for slot in list(self._slots):
            self._end(slot)
        self.drafting.reset()

    def update_max_model_len(self, max_model_len: int) -> None:
        self.drafting.max_model_len = int(max_model_len)

    def _read_rows(
        self, input_batch: InputBatch, num_sampled: torch.Tensor, num_rejected: torch.Tensor
    ) -> StepRows:
        """The step's counts and each row's new tokens, gathered on the device and copied once."""
        n = input_batch.num_reqs
        slots = input_batch.idx_mapping[:n].long()
        total = self.req_states.total_len.gpu[slots].long()  # (n,)
        columns = (total[:, None] - len(self._window) + self._window).clamp_(min=0)  # (n, K + 1)
        tail = self.req_states.all_token_ids.gpu[slots[:, None], columns].long()  # (n, K + 1)
        counts = torch.stack([num_sampled[:n].long(), num_rejected[:n].long(), total], dim=1)  # (n, 3)
        host = torch.cat([counts, tail], dim=1).cpu().numpy()  # the step's one copy to the host
        return StepRows(host[:, 0], host[:, 1], host[:, 2], host[:, 3:])

    def _read_tokens(self, slots: list[int], length: int) -> np.ndarray:
        """int32[len(slots), length]: the first ``length`` tokens of these slots' rows."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        return self.req_states.all_token_ids.gpu[index, :length].cpu().numpy()

    @torch.inference_mode()
    def propose(
        self,
        input_batch: InputBatch,
        attn_metadata: Any,
        slot_mappings: Any,
        last_hidden_states: torch.Tensor,
        aux_hidden_states: list[torch.Tensor] | None,
        num_sampled: torch.Tensor,
        num_rejected: torch.Tensor,
        last_sampled: torch.Tensor,
        next_prefill_tokens: torch.Tensor,
        temperature: torch.Tensor,
        seeds: torch.Tensor,
        dp_sync_state: Any = None,
        dummy_run: bool = False,
        skip_attn_for_dummy_run: bool = False,
        mm_inputs: Any = None,
        is_profile: bool = False,
        num_speculative_tokens: int | None = None,
    ) -> torch.Tensor:
        """int64[num_reqs, K]: drafts for the batch's rows (only the first ``num_speculative_tokens``
        columns are used this step). Reads ``input_batch``, ``num_sampled`` and ``num_rejected``
        (int[num_reqs]) and the request states; the hidden states, sampling inputs and the rest are
        for speculators with a draft model."""
        n = input_batch.num_reqs
        if dummy_run or n == 0:
            return self.drafts[:n]
        start = time.perf_counter()
        self.stats.steps += 1
        k = self.num_speculative_steps
        width = k if num_speculative_tokens is None else min(int(num_speculative_tokens), k)
        rows = self._read_rows(input_batch, num_sampled, num_rejected)
        slots = [int(s) for s in input_batch.idx_mapping_np[:n]]
        decoded = [b for b in range(n) if rows.sampled[b] > 0 and slots[b] >= 0]
        started = self._start_new(decoded, slots, rows)

        drafts = np.repeat(rows.tail[:, -1:], k, axis=1)  # (n, K): the filler, the row's last token
        confidences = np.zeros((n, k), np.float32)
        live: list[tuple[int, Request, np.ndarray]] = []
        for b in decoded:
            entry = self._slots[slots[b]]
            if b not in started:
                sampled = int(rows.sampled[b])
                accepted = rows.tail[b, -sampled:].astype(np.int32)
                verified = sampled - 1 + int(rows.rejected[b])  # the draft slots vLLM checked
                self.drafting.verified(entry.request, entry.tokens.view(), accepted, verified)
                entry.tokens.extend(accepted)
            if entry.tokens.length < self.drafting.max_model_len:
                live.append((b, entry.request, entry.tokens.view()))
        if width == 0:
            self.stats.steps_not_drafted += 1
        elif live:
            proposals = self.drafting.propose([(request, context) for _, request, context in live])
            for (b, request, context), proposal in zip(live, proposals, strict=True):
                size = min(len(proposal.tokens), width, self.drafting.max_model_len - len(context))
                drafts[b, :size] = self.drafting.commit(request, proposal, size)
                confidences[b, :size] = conditional(proposal.accept[:size])
        self.drafts[:n].copy_(torch.from_numpy(drafts))
        self.draft_token_confidence_probs[:n].copy_(torch.from_numpy(confidences))
        self.stats.propose_seconds += time.perf_counter() - start
        return self.drafts[:n]

    def _start_new(self, decoded: list[int], slots: list[int], rows: StepRows) -> set[int]:
        """Start the requests of the decoded rows that restspec has not seen decoded yet (and of any
        whose tokens fell out of step with vLLM's, which vLLM's calls rule out); returns those rows.
        Their whole rows come to the host in one copy; this step's tokens are their first output."""
        new = [
            b
            for b in decoded
            if (entry := self._slots.get(slots[b])) is None
            or entry.tokens.length != rows.total[b] - rows.sampled[b]
        ]
        if not new:
            return set()
        tokens = self._read_tokens([slots[b] for b in new], int(max(rows.total[b] for b in new)))
        for b, row in zip(new, tokens, strict=True):
            self._end(slots[b])
            total, sampled = int(rows.total[b]), int(rows.sampled[b])
            request = self.drafting.start(row[: total - sampled])
            entry = SlotTokens(row[: total - sampled])
            accepted = row[total - sampled : total].astype(np.int32)
            self.drafting.verified(request, entry.view(), accepted)
            entry.extend(accepted)
            self._slots[slots[b]] = SlotRequest(request, entry)
        return set(new)


def speculator_stats(worker: Any) -> dict[str, Any]:
    """The speculator's :class:`~restspec.integrations.vllm.ProposerStats` as a dict, read inside
    vLLM's worker process: ``llm.collective_rpc(speculator_stats)`` (vLLM sends functions pickled only
    with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``). Reaches vLLM internals
    (``worker.model_runner.speculator``), so it is meant for tests and debugging."""
    return asdict(worker.model_runner.speculator.stats)
