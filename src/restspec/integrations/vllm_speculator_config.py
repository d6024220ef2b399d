"""vLLM 0.34+'s config of the speculative method ``"restspec"`` (registered by
:mod:`restspec_vllm_plugin`).

vLLM reads it in every process that builds a speculative config, so, as vLLM asks of such modules,
it imports no speculator: vLLM builds :class:`~restspec.integrations.vllm_speculator.RestspecSpeculator`
from :attr:`RestspecSpeculatorConfig.speculator_class` in its workers."""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu.spec_decode.speculator_config import SpeculatorConfig

from restspec.integrations.vllm import ProposerConfig


def proposer_config(spec: Any) -> ProposerConfig:
    """restspec's options for vLLM's ``SpeculativeConfig`` ``spec``: its ``speculator_options`` (the
    fields of :class:`ProposerConfig`) when given, else the file ``RESTSPEC_VLLM_CONFIG`` names."""
    if spec.speculator_options is None:
        return ProposerConfig.from_env()
    return ProposerConfig.from_mapping(spec.speculator_options, "speculative_config.speculator_options")


class RestspecSpeculatorConfig(SpeculatorConfig):
    """No draft model: the target's config stands in for it (the base class's setup, as for
    ``ngram``). Options travel in ``speculator_options``; :meth:`apply_options` checks them when the
    config is built, so a wrong key stops ``vllm serve`` before any worker starts."""

    speculator_class = "restspec.integrations.vllm_speculator.RestspecSpeculator"
    supported_options = frozenset({"speculator_options"})
    # vLLM's adaptive verification, when enabled, reads confidences restspec computes from what vLLM
    # accepted (RestspecSpeculator.draft_token_confidence_probs), not from draft logits
    adaptive_verification_uses_draft_logits = False

    @classmethod
    def apply_options(cls, spec: Any) -> None:
        proposer_config(spec)
