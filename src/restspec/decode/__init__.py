"""Decoding: tree verification on any HF causal LM through a forward backend, acceptance, the one
generate loop."""

from restspec.decode.accept import Acceptance, accept, greedy_accept, sample_accept, warp_logits, warped_probs
from restspec.decode.backends import ForwardBackend, ModelForward, choose_backend
from restspec.decode.budget import BudgetPolicy, FixedBudget
from restspec.decode.config import GenerationConfig, SamplingConfig, generation_config
from restspec.decode.generate import GenerationResult, SpeculativeGenerator, StepStats, StreamChunk
from restspec.decode.verify import (
    ModelLayout,
    compact_cache,
    forward_tree,
    model_layout,
    new_cache,
    prefill,
    tree_attention_bias,
)

__all__ = [
    "Acceptance",
    "BudgetPolicy",
    "FixedBudget",
    "ForwardBackend",
    "GenerationConfig",
    "GenerationResult",
    "ModelForward",
    "ModelLayout",
    "SamplingConfig",
    "SpeculativeGenerator",
    "StepStats",
    "StreamChunk",
    "accept",
    "choose_backend",
    "compact_cache",
    "forward_tree",
    "generation_config",
    "greedy_accept",
    "model_layout",
    "new_cache",
    "prefill",
    "sample_accept",
    "tree_attention_bias",
    "warp_logits",
    "warped_probs",
]
