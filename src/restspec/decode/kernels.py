"""CPU kernels for narrow forwards: verification scores 1..65 rows at a time, where stock kernels are slow.

On a 2-core x86 CPU in float32, ``F.linear`` over 2..16 rows leaves MKL's matrix-vector path and
costs about twice a one-row forward, although the weights are read once either way. oneDNN's matmul
over weights packed once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the kernels TorchInductor uses for frozen CPU linears) reads them at the
matrix-vector speed: measured on SmolLM2-135M, 500 cached tokens, a forward over 1 / 2 / 5 / 9 / 17
rows took 92 / 133 / 136 / 161 / 191 ms stock and 72 / 73 / 92 / 105 / 128 ms here, both through
the model's own forward (``python -m benchmarks.latency``, benchmarks/results/latency.md; a busy
moment, the stock plain step is 77 ms on a quiet machine). The second part of the gain is
attention: given a mask, transformers' SDPA path copies every key/value head ``n_rep`` times
(``repeat_kv``) unless told that grouped-query SDPA is safe, which on CPU it is
(``TRANSFORMERS_SDPA_FORCE_GQA``).

Each oneDNN call also costs about 25-30 µs besides the matmul itself (on a 64x128 weight a call took
31-41 µs, of which oneDNN's own verbose log timed the primitive at 5-10 µs; measured on 2026-11-22),
some 5-7 ms over SmolLM2's 211 linears per forward. Linears that read the same
input tensor, found by one probe forward (a layer's q/k/v projections, an MLP's gate and up), are
therefore packed as one matmul over their concatenated weights: 121 calls instead of 211. Every
output column is the same dot product as before, so the logits are bitwise those of separate packed
linears; forwards at every width from 1 to 32 rows took a few percent less in an interleaved
comparison.

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


class _Group:
    """Linears that read the same input tensor (a layer's q/k/v projections, an MLP's gate and up):
    one packed matmul over their concatenated weights serves them all.

    The first member to be called with an input computes every member's output and keeps them until
    the last member has taken its own; a member called with another input computes them afresh, so a
    call order other than the probed one costs time, never correctness. A group of one is a plain
    packed linear."""

    def __init__(self, modules: list[torch.nn.Linear]) -> None:
        self.modules = [weakref.proxy(m) for m in modules]
        self.sizes = [m.out_features for m in modules]
        self._pack()
        self._kept: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None
        """(input, every member's output): read and replaced whole, so another thread's forward
        through the same model cannot mix its outputs into this one's."""

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._params)

    def _pack(self) -> None:
        self._params = [m.weight for m in self.modules] + [m.bias for m in self.modules if m.bias is not None]
        weight = torch.cat([m.weight.detach() for m in self.modules])  # (sum of out_features, in)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)
        self.bias = (
            None
            if all(m.bias is None for m in self.modules)
            else torch.cat(
                [
                    m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                    for m in self.modules
                ]
            )
        )
        self.version = self._versions()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for input ``x``, side by side in the last dimension."""
        if self._versions() != self.version:  # weights changed in place since packing
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for input ``x``."""
        kept = self._kept
        if index == 0 or kept is None or kept[0] is not x:
            kept = (x, tuple(part.contiguous() for part in self.matmul(x).split(self.sizes, dim=-1)))
        # hold no tensors once every member is served
        self._kept = None if index == len(self.sizes) - 1 else kept
        return kept[1][index]


class _PackedForward:
    """Replacement ``forward`` of one ``nn.Linear``: its group's packed matmul inside
    :func:`fast_kernels`, ``F.linear`` outside."""

    def __init__(self, module: torch.nn.Linear, group: _Group, index: int) -> None:
        self.module = weakref.proxy(module)
        self.group = group
        self.index = index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not _active.get() or x.dtype != torch.float32:
            return F.linear(x, m.weight, m.bias)
        return self.group.output(self.index, x)


def packed_group(modules: list[torch.nn.Linear]) -> _Group | None:
    """The packed group whose members are exactly ``modules``, in that order (None if they are not
    one group, e.g. not packed at all)."""
    forwards = [vars(m).get("forward") for m in modules]
    if not all(isinstance(f, _PackedForward) for f in forwards):
        return None
    group = forwards[0].group
    if len(group.sizes) != len(modules) or any(
        f.group is not group or f.index != i for i, f in enumerate(forwards)
    ):
        return None
    return group


def shared_input_groups(model: Any, linears: list[torch.nn.Linear]) -> list[list[torch.nn.Linear]]:
    """``linears`` grouped by the input tensor they read, in call order, found by one two-token
    forward of ``model``; a linear the probe did not reach (or every one, if the model cannot run
    on bare ``input_ids``) is a group of its own."""
    calls: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args[0]))) for m in linears]
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=False)
    except Exception:  # a model that needs more than input_ids: no grouping
        calls.clear()
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[torch.nn.Linear]] = []
    by_input: dict[int, list[torch.nn.Linear]] = {}
    seen: set[int] = set()
    for module, x in calls:  # `calls` keeps every input alive, so ids are not reused
        if id(module) in seen:
            continue
        seen.add(id(module))
        group = by_input.get(id(x))
        if group is None:
            group = by_input[id(x)] = []
            groups.append(group)
        group.append(module)
    groups += [[m] for m in linears if id(m) not in seen]
    return groups


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
        self.layers = self.groups = 0
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
        groups = shared_input_groups(model, linears)
        for members in groups:
            group = _Group(members)
            for index, module in enumerate(members):
                module.forward = _PackedForward(module, group, index)
        self.layers, self.groups = len(linears), len(groups)

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
