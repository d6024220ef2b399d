#!/usr/bin/env bash
# GPU check: on a machine with a CUDA device, run restspec's decode parity tests on the GPU and a short
# `restspec generate --device cuda`. Run from anywhere, with restspec and its test dependencies installed
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
echo "gpu_check: all passed"
