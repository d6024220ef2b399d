"""restspec inside other serving engines. :mod:`restspec.integrations.vllm`: the drafter as a vLLM
speculative method. Each integration imports its engine lazily, so importing restspec never needs it."""
