"""restspec inside other serving engines. :mod:`restspec.integrations.vllm`: the drafter as a vLLM
speculative method (0.32/0.33; :mod:`~restspec.integrations.vllm_speculator` on 0.34+, which imports
vLLM). The rest imports its engine lazily, so importing restspec never needs it."""
