"""CPU kernels for narrow forwards: verification scores 1..65 rows at a time, where stock kernels are slow.

On a 2-core x86 CPU in float32, ``F.linear`` over 2..16 rows leaves MKL's matrix-vector path and
costs about twice a one-row forward, although the weights are read once either way. oneDNN's matmul
over weights packed once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the kernels TorchInductor uses for frozen CPU linears) reads them at the
matrix-vector speed: measured on SmolLM2-135M, 500 cached tokens, a forward over 1 / 2 / 5 / 9 / 17
rows took 77 / 119 / 121 / 140 / 161 ms stock and 72 / 68 / 82 / 106 / 112 ms here
(``python -m restspec.bench.latency``, docs/benchmarks-decode.md). The second part of the gain is
attention: given a mask, transformers' SDPA path copies every key/value head ``n_rep`` times
(``repeat_kv``) unless told that grouped-query SDPA is safe, which on CPU it is
(``TRANSFORMERS_SDPA_FORCE_GQA``).

:func:`fast_kernels` packs a model's float32 ``nn.Linear`` weights once (an extra copy of them in
memory) and returns a context manager; only forwards run inside it use the packed weights. Outside
it every wrapped layer computes ``F.linear`` exactly as before, so ``model.generate`` is unchanged.
Results differ from the stock kernels by float rounding only (about 1e-7 relative), the same kind of
difference as between MKL's one-row and many-row paths that verification always had.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"
_BATCH_HINT = 16
"""Row count oneDNN packs for; measured best over 1..32 rows on the 2-core machine."""

_active: contextvars.ContextVar[bool] = contextvars.ContextVar("restspec_fast_kernels", default=False)
_packed_models: weakref.WeakKeyDictionary[Any, FastKernels] = weakref.WeakKeyDictionary()


def available() -> bool:
    """oneDNN's packed linear is built into this torch."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class _PackedForward:
    """Replacement ``forward`` of one ``nn.Linear``: packed weights inside :func:`fast_kernels`."""

    def __init__(self, module: torch.nn.Linear) -> None:
        self.module = weakref.proxy(module)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _BATCH_HINT)
        self.version = module.weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not _active.get() or x.dtype != torch.float32:
            return F.linear(x, m.weight, m.bias)
        if m.weight._version != self.version:  # weights changed in place since packing
            self.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), _BATCH_HINT)
            self.version = m.weight._version
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, m.bias, "none", [], "")


def _free_memory_bytes() -> int | None:
    """Memory available to this process now (Linux), None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class FastKernels:
    """The packed layers of one model; entering it routes that thread's forwards through them.

    Packs nothing (``layers == 0``: stock kernels) without oneDNN, for weights that are not float32
    on the CPU, and when the packed copy would take more than half of the free memory."""

    def __init__(self, model: Any) -> None:
        self.layers = 0
        if not available():
            return
        linears = [
            module
            for module in model.modules()
            if type(module) is torch.nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
            and "forward" not in vars(module)
        ]
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        free = _free_memory_bytes()
        if free is not None and size > free / 2:
            return
        for module in linears:
            module.forward = _PackedForward(module)
        self.layers = len(linears)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        token = _active.set(self.layers > 0)
        previous = os.environ.get(_GQA_SWITCH)
        os.environ[_GQA_SWITCH] = "1"
        try:
            yield
        finally:
            _active.reset(token)
            if previous is None:
                os.environ.pop(_GQA_SWITCH, None)
            else:
                os.environ[_GQA_SWITCH] = previous


def fast_kernels(model: Any) -> FastKernels:
    """The (once per model) packed kernels of ``model``; ``with fast_kernels(model)(): model(...)``."""
    kernels = _packed_models.get(model)
    if kernels is None:
        kernels = _packed_models[model] = FastKernels(model)
    return kernels
