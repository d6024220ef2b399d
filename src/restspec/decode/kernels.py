"""Packed CPU kernels for narrow forwards: verification scores 1..65 rows at a time, where stock kernels
can be slow.

On some x86 CPUs in float32, ``F.linear`` over 2..16 rows leaves MKL's matrix-vector path and costs
about twice a one-row forward, although the weights are read once either way. oneDNN's matmul over
weights packed once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, the kernels TorchInductor uses for frozen CPU linears) reads them at the
matrix-vector speed there. On other CPUs the stock kernels are as fast or faster: whether packing pays
is measured per machine (:func:`restspec.decode.backends.choose_backend`), never assumed.

Each oneDNN call also costs some tens of microseconds besides the matmul itself, so linears that read
the same input tensor, found by one probe forward (a layer's q/k/v projections, an MLP's gate and up),
are packed as one matmul over their concatenated weights. Every output column is the same dot product
as in separate packed linears, so the logits are bitwise those of separate packed linears.

:class:`PackedWeights` packs a model's float32 ``nn.Linear`` weights once (an extra copy of them in
memory) and writes nothing into the model: the direct forward (:mod:`restspec.decode.direct`) calls the
group matmuls itself. Results differ from the stock kernels by float rounding only, the same kind of
difference as between MKL's one-row and many-row paths.

Routing the model's own forward to the packed matmuls without patching its modules would take a
``TorchFunctionMode`` around the forward; that was built and measured (Intel Xeon, SmolLM2-135M,
float32, 320 cached tokens): it sees every tensor operation of the forward, and its per-operation cost
(about 20 ms a forward) outweighed what the packed matmuls saved at 1 and 16 inputs, so it was dropped.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_BATCH_HINT = 16
"""Row count oneDNN packs for (the widest trees verification usually runs)."""


def available() -> bool:
    """oneDNN's packed linear is built into this torch."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def joined_bias(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The biases of linears joined along their outputs (zeros for a member without one), or None
    where none has a bias."""
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            b.detach() if b is not None else w.new_zeros(w.shape[0])
            for w, b in zip(weights, biases, strict=True)
        ]
    )


class PackedGroup:
    """Linears that read the same input (a layer's q/k/v projections, an MLP's gate and up): one packed
    matmul over their concatenated weights serves them all. A group of one is a plain packed linear.

    Holds the modules' parameters (never writes them); packs again when one changed in place."""

    def __init__(self, modules: list[torch.nn.Linear]) -> None:
        self.weights = [m.weight for m in modules]
        self.biases = [m.bias for m in modules]
        self.sizes = [m.out_features for m in modules]
        self._pack()

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self.weights, *self.biases) if t is not None)

    def _pack(self) -> None:
        weight = torch.cat([w.detach() for w in self.weights])  # (sum of out_features, in)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)
        self.bias = joined_bias(self.weights, self.biases)
        self.version = self._versions()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for input ``x`` (..., in), side by side: (..., sum of out_features)."""
        if self._versions() != self.version:  # weights changed in place since packing
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _free_memory_bytes() -> int | None:
    """Memory available to this process now (Linux), None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_float32_linears(model: Any) -> list[torch.nn.Linear]:
    """``model``'s ``nn.Linear`` layers with float32 weights on the CPU (what these kernels serve)."""
    return [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    ]


class _LinearRecorder(TorchFunctionMode):
    """Records ``(weight, input)`` of every ``F.linear`` call run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.calls.append((args[1] if len(args) > 1 else kwargs["weight"], args[0]))
        return func(*args, **kwargs)


def shared_input_groups(model: Any, linears: list[torch.nn.Linear]) -> list[list[torch.nn.Linear]]:
    """``linears`` grouped by the input tensor they read, in call order, found by one two-token
    forward of ``model`` (recorded by a function mode, no hooks on the model); a linear the probe did
    not reach (or every one, if the model cannot run on bare ``input_ids``) is a group of its own."""
    recorder = _LinearRecorder()
    try:
        with torch.inference_mode(), recorder:
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=model.device), use_cache=False)
    except Exception:  # a model that needs more than input_ids: no grouping
        recorder.calls.clear()
    by_weight = {id(m.weight): m for m in linears}
    groups: list[list[torch.nn.Linear]] = []
    by_input: dict[int, list[torch.nn.Linear]] = {}
    seen: set[int] = set()
    for weight, x in recorder.calls:  # `calls` keeps every input alive, so ids are not reused
        module = by_weight.get(id(weight))
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        group = by_input.get(id(x))
        if group is None:
            group = by_input[id(x)] = []
            groups.append(group)
        group.append(module)
    groups += [[m] for m in linears if id(m) not in seen]
    return groups


class GroupIndex:
    """Groups of linears (each with ``weights`` and ``sizes``, one matmul for them all) looked up by
    their members: what the direct forward asks a set of kernels for."""

    def __init__(self, groups: list[Any]) -> None:
        self.groups = groups
        self._by_weight: dict[int, tuple[Any, int]] = {
            id(w): (group, index) for group in groups for index, w in enumerate(group.weights)
        }

    def member(self, weight: torch.Tensor) -> tuple[Any, int] | None:
        """The group holding ``weight`` and its index there, None if no group holds it."""
        return self._by_weight.get(id(weight))

    def group_of(self, modules: list[torch.nn.Linear]) -> Any | None:
        """The group whose members are exactly ``modules``, in that order; None if they are not one."""
        found = [self.member(m.weight) for m in modules]
        if any(f is None for f in found):
            return None
        group = found[0][0]  # type: ignore[index]
        if len(group.sizes) != len(modules) or any(
            g is not group or i != index
            for index, (g, i) in enumerate(found)  # type: ignore[misc]
        ):
            return None
        return group


class PackedWeights(GroupIndex):
    """The packed groups of one model's float32 CPU ``nn.Linear`` layers, built once; the model is only
    read. Build with :meth:`of`, which says None where packing does not apply."""

    backend_name = "direct-packed"

    def __init__(self, model: Any, linears: list[torch.nn.Linear]) -> None:
        super().__init__([PackedGroup(members) for members in shared_input_groups(model, linears)])
        self.layers = len(linears)

    @classmethod
    def of(cls, model: Any) -> PackedWeights | None:
        """The packed weights of ``model``; None without oneDNN, for a model with no float32 CPU
        linears, and when the packed copy would take more than half of the free memory."""
        if not available():
            return None
        linears = cpu_float32_linears(model)
        if not linears:
            return None
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        free = _free_memory_bytes()
        if free is not None and size > free / 2:
            return None
        return cls(model, linears)
