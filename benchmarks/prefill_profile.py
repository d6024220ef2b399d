"""Where a long prompt's prefill goes: the embedded model's own forward over an evaluation-set prompt.

    python -m benchmarks.prefill_profile [--item long-rag-01] [--repeats 3] [--reused 55] [--out FILE.json]

Both plain ``generate`` and restspec read the prompt with this same forward (logits of the last token
only), so its time bounds what any decoder can gain on a request with a long prompt and a short
answer. Reports the prefill's median seconds, the profiler's split of one prefill into matmuls,
attention and the rest, and the matmul and attention throughput (GFLOPS) that split implies.

After a reused prefix (``--reused`` tokens, as a chat template's system prompt kept from an earlier
request) restspec prefills the rest as one chunk on this machine's chosen forward backend: timed
too, interleaved with the fresh prefill, with the chunk's attention under its explicit mask and with
the causal kernel restspec uses (``Segment.causal``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from restspec.bench.runner import machine_info
from restspec.bench.workloads import load_workload
from restspec.decode import ModelForward, choose_backend, new_cache, prefill
from restspec.decode.verify import prefill_segment
from restspec.models import load_model

EVALSET = Path(__file__).parent / "evalset" / "evalset.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--item", default="long-rag-01")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reused", type=int, default=55, help="prompt tokens kept from an earlier request")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    loaded = load_model("smollm2")
    model, config = loaded.model, loaded.model.config
    item = next(it for it in load_workload(str(EVALSET)) if it.item_id == args.item)
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": item.turns[0]}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    n = ids.shape[1]
    with torch.inference_mode():
        model(ids, logits_to_keep=1)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            seconds.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, logits_to_keep=1)
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    matmul_s = self_s.get("aten::mm", 0.0) + self_s.get("aten::addmm", 0.0)
    attention_s = sum(s for k, s in self_s.items() if "scaled_dot_product" in k)
    total_s = sum(self_s.values())
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    linear_params = sum(m.weight.numel() for m in linears)
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    attention_flop = 2 * 2 * heads * dim * n * n / 2 * config.num_hidden_layers  # QK and PV, causal half
    report = {
        "machine": machine_info(),
        "item": args.item,
        "prompt_tokens": n,
        "prefill_s_median": round(statistics.median(seconds), 3),
        "prefill_s_all": [round(s, 3) for s in seconds],
        "profiled_s": {
            "matmul": round(matmul_s, 3),
            "attention": round(attention_s, 3),
            "other": round(total_s - matmul_s - attention_s, 3),
        },
        "gflops": {
            "matmul": round(2 * linear_params * n / matmul_s / 1e9, 1) if matmul_s else None,
            "attention": round(attention_flop / attention_s / 1e9, 1) if attention_s else None,
        },
    }
    report["after_reused_prefix"] = reused_prefix_seconds(
        loaded, ids[0, :-1].numpy(), args.reused, args.repeats
    )
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def reused_prefix_seconds(loaded, prompt, reused: int, repeats: int) -> dict:
    """Median seconds to prefill ``prompt`` fresh (the model's forward) and, after its first ``reused``
    tokens were prefilled, the rest as one chunk on the chosen backend, with its mask and causal."""
    backend = choose_backend(loaded.model, name=loaded.name)
    own = ModelForward(loaded.model)

    def fresh() -> float:
        start = time.perf_counter()
        prefill(own, new_cache(), prompt)
        return time.perf_counter() - start

    def chunk(causal: bool) -> float:
        cache = new_cache()
        prefill(own, cache, prompt[:reused])
        segment = prefill_segment(backend, cache, prompt[reused:], reused)
        segment = dataclasses.replace(segment, causal=causal and segment.causal)
        start = time.perf_counter()
        backend.forward_batch([segment])
        return time.perf_counter() - start

    ways = {"fresh": fresh, "chunk_masked": lambda: chunk(False), "chunk_causal": lambda: chunk(True)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, run in ways.items():
            seconds[way].append(run())
    return {
        "backend": backend.name,
        "reused_tokens": reused,
        "chunk_tokens": len(prompt) - reused,
        **{f"{way}_s_median": round(statistics.median(s), 3) for way, s in seconds.items()},
        **{f"{way}_s_all": [round(x, 3) for x in s] for way, s in seconds.items()},
    }


if __name__ == "__main__":
    main()
