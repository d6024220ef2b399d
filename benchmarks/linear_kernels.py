"""Can a matmul kernel make a wide forward cost about what a one-input forward costs? (issue 24)

    python -m benchmarks.linear_kernels [--widths 1,4,8,12,16] [--repeats 15] [--out FILE.json]

Times every linear of a SmolLM2-135M-shaped model (30 layers of q/k/v, o, gate/up and down, grouped
as restspec's packed backend groups them, and the 49152 x 576 output head: 538 MB of float32 weights,
random values) over ``width`` input rows, median of ``--repeats`` passes, each kernel over the same
inputs:

- ``stock``: ``F.linear`` (MKL), what transformers and restspec's ``direct`` forward run;
- ``onednn-packed``: oneDNN over weights packed once (restspec's ``direct-packed``);
- ``numba-4x2``: a dot-product kernel (numba, 2 threads) over the weights as they are, four input
  rows by two weight rows per pass over a row pair, so each weight row is read once per 4 rows;
- ``numba-4x2, arithmetic only``: the same kernel over one layer's weights reused by every layer
  (cache-resident, no output head): what the arithmetic costs without streaming the weights;
- ``blocks``: restspec's block kernel (``direct-blocks``, built for this machine) over random 4-bit
  codes with a scale and an offset per block of 32 (Q4_1's layout) and random 8-bit codes for the
  head (Q8_0's): 111 MB; left out where no C compiler builds it.

If weight streaming and arithmetic overlapped, a wide pass would cost the larger of the two; it costs
about their sum where they do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit, prange

from benchmarks.latency import timed
from restspec.bench.runner import machine_info
from restspec.decode import blocks

LAYERS = 30
LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
"""(out, in) of a layer's grouped linears: q/k/v, o, gate/up, down."""
HEAD_SHAPE = (49152, 576)
THREADS = 2


@njit(fastmath=True, inline="always", boundscheck=False)
def _dot4x2(x, m, w, n, k_in):
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0)
    for k in range(k_in):
        w0 = w[n, k]
        w1 = w[n + 1, k]
        x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
        a0 += x0 * w0
        a1 += x1 * w0
        a2 += x2 * w0
        a3 += x3 * w0
        b0 += x0 * w1
        b1 += x1 * w1
        b2 += x2 * w1
        b3 += x3 * w1
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(fastmath=True, inline="always", boundscheck=False)
def _dot1x2(x, m, w, n, k_in):
    a = b = np.float32(0)
    for k in range(k_in):
        a += x[m, k] * w[n, k]
        b += x[m, k] * w[n + 1, k]
    return a, b


@njit(parallel=True, fastmath=True, boundscheck=False)
def numba_linear(x, w, out):
    """out[m, n] = x[m] . w[n] for an even number of weight rows."""
    rows, k_in = x.shape
    for half in prange(w.shape[0] // 2):
        n = 2 * half
        m = 0
        while m + 4 <= rows:
            a0, a1, a2, a3, b0, b1, b2, b3 = _dot4x2(x, m, w, n, k_in)
            out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = a0, a1, a2, a3
            out[m, n + 1], out[m + 1, n + 1], out[m + 2, n + 1], out[m + 3, n + 1] = b0, b1, b2, b3
            m += 4
        while m < rows:
            out[m, n], out[m, n + 1] = _dot1x2(x, m, w, n, k_in)
            m += 1


def block_group(weight: torch.Tensor, rng: np.random.Generator, bits: int, lib) -> blocks.BlockGroup:
    """``weight``'s linear as restspec's block backend runs it, over random codes and scales in the
    kernel's layout: 4-bit codes with d and m per block of 32 (``bits=4``), or 8-bit codes and d."""
    n, k = weight.shape
    lanes, block = blocks.LANES, blocks.BLOCK
    linear = torch.nn.utils.skip_init(torch.nn.Linear, k, n, bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    codes = rng.integers(0, 256, (n // lanes, k * bits // 8, lanes), dtype=np.uint8)
    scales = [rng.standard_normal((n // lanes, k // block, lanes), dtype=np.float32) * 0.01 for _ in range(2)]
    encoded = blocks.Encoded(codes, scales[0], scales[1] if bits == 4 else None)
    return blocks.BlockGroup([linear], encoded, lib)


def median_ms(run: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed(run, repeats, warmup=1)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="1,4,8,12,16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) for _ in range(LAYERS) for s in LAYER_SHAPES]
    weights.append(rng.standard_normal(HEAD_SHAPE, dtype=np.float32))
    resident = weights[: len(LAYER_SHAPES)] * LAYERS
    tensors = [torch.from_numpy(w) for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(t, 16) for t in tensors]
    lib = blocks.kernel()
    groups = (
        [block_group(t, rng, 4 if t.shape != HEAD_SHAPE else 8, lib) for t in tensors]
        if lib is not None
        else []
    )
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        xs = {k: rng.standard_normal((width, k), dtype=np.float32) for k in (576, 1536)}
        txs = {k: torch.from_numpy(v) for k, v in xs.items()}

        def numba_over(ws: list[np.ndarray], xs=xs, width=width) -> Callable[[], None]:
            outs = [np.empty((width, w.shape[0]), np.float32) for w in ws]
            return lambda: [numba_linear(xs[w.shape[1]], w, o) for w, o in zip(ws, outs, strict=True)]

        kernels = {
            "stock": lambda txs=txs: [torch.nn.functional.linear(txs[t.shape[1]], t) for t in tensors],
            "onednn-packed": lambda txs=txs: [
                torch.ops.mkldnn._linear_pointwise(txs[t.shape[1]], p, None, "none", [], "")
                for t, p in zip(tensors, packed, strict=True)
            ],
            "numba-4x2": numba_over(weights),
            "numba-4x2, arithmetic only": numba_over(resident),
        }
        if groups:
            kernels["blocks"] = lambda txs=txs: [g.matmul(txs[g.in_features]) for g in groups]
        row = {"width": width} | {
            name: round(median_ms(run, args.repeats), 1) for name, run in kernels.items()
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
