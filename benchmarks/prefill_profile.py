"""Where a long prompt's prefill goes: the embedded model's own forward over an evaluation-set prompt.

    python -m benchmarks.prefill_profile [--item long-rag-01] [--repeats 3] [--out FILE.json]

Both plain ``generate`` and restspec read the prompt with this same forward (logits of the last token
only), so its time bounds what any decoder can gain on a request with a long prompt and a short
answer. Reports the prefill's median seconds, the profiler's split of one prefill into matmuls,
attention and the rest, and the matmul and attention throughput (GFLOPS) that split implies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from restspec.bench.runner import machine_info
from restspec.bench.workloads import load_workload
from restspec.models import load_model

EVALSET = Path(__file__).parent / "evalset" / "evalset.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--item", default="long-rag-01")
    parser.add_argument("--repeats", type=int, default=3)
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
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
