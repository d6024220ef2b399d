"""Forward backends: objects that wrap a model and run its verification forwards, chosen by measurement.

Every backend holds the model and only reads it: nothing is written into its modules, its config or
``os.environ``. All of them prefill with the model's own forward (causal mask); they differ in how a
tree is scored:

- ``model``: the model's own forward (what ``model.generate`` runs);
- ``direct``: :class:`~restspec.decode.direct.DirectForward`, the same operations as a Llama-family
  forward in one loop over the layers, with the model's own linears;
- ``direct-packed``: the direct forward calling the oneDNN group matmuls of
  :class:`~restspec.decode.kernels.PackedWeights` (CPU, float32);
- ``direct-split``: ``direct`` for narrow forwards and ``direct-packed`` from the width on where
  the packed kernels are measured faster (:class:`SplitBackend`);
- ``direct-blocks``: the direct forward computing from the codes of block-encoded weights
  (:class:`~restspec.decode.blocks.BlockWeights`: float32 weights that decode exactly from 4- or 8-bit
  blocks, as a quantized GGUF file's do; CPU, float32), every layer in one C call where the layers are
  plain Llama-family ones (:class:`~restspec.decode.blocks.BlockDecoder`);
- ``direct-blocks-split``: ``direct-blocks`` for narrow forwards and ``direct-packed`` from the width
  on where the packed kernels are measured faster (the block kernel decodes every weight once per few
  rows: ahead where a forward mostly reads weights, behind on wide batches with AVX2's 16 registers).

Which is fastest depends on the CPU, the device, the dtype and the width of the forward. Measured on an
Intel Xeon with AVX-512/AMX (2 cores, other work running; SmolLM2-135M in float32, 320 cached tokens,
medians of 5 interleaved rounds at 1 / 8 / 16 inputs): ``model`` 45 / 82 / 89 ms, ``direct`` 40 / 75 /
83 ms, ``direct-packed`` 51 / 64 / 70 ms; the packed kernels win on wide trees and lose on plain steps.
So :func:`choose_backend` measures, once per machine + model + dtype + device, and keeps the fastest
backend that passes an exactness probe against the model's own forward and is no slower than it at any
width of a plain step or a tree; where a narrow-side forward (stock or block kernels) and the packed
one each win at some widths, their split takes the faster at every width.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from restspec.decode.blocks import BlockWeights
from restspec.decode.direct import DirectForward, GroupKernels
from restspec.decode.kernels import PackedWeights
from restspec.decode.verify import ModelLayout, Segment, model_layout, new_cache, tree_inputs
from restspec.draft.tree import DraftTree
from restspec.errors import ModelError
from restspec.models import dtype_name

BACKEND_NAMES = ("model", "direct", "direct-packed", "direct-split", "direct-blocks", "direct-blocks-split")
"""Every backend, in the order :func:`choose_backend` considers them."""
SPLITS: dict[str, tuple[str, str]] = {
    "direct-split": ("direct", "direct-packed"),
    "direct-blocks-split": ("direct-blocks", "direct-packed"),
}
"""The split backends: name -> (the member below the split width, the member from it on)."""
CHOICE_VERSION = 13
"""Bump when the backends or the measurement change, so cached choices are made again (3: a choice
timed while other work competed for the CPU is no longer cached; 4: the direct forward without module
calls; 5: taken by an experiment not kept; 6: the block-weight backend; 7: batch widths timed, the
block kernel's split; 8: the block kernel's wide tiles; 9: the block decoder; 10: the block kernel
scaling a block's sums instead of its weights; 11: its narrow tiles up to 12 rows; 12: three rows in one-group
tiles; 13: the block kernel on bfloat16 and float16 weights, which a cached choice for such a model never
tried)."""
TIMING_WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16)
"""Forward widths (root + tree nodes) the candidates are timed at: a plain step and typical trees."""
BATCH_WIDTHS: tuple[int, ...] = (32, 64)
"""Wider forwards, timed too: batches of several requests' trees and prompt chunks. They place a split
backend's width and break ties; the choice itself is made on :data:`TIMING_WIDTHS`."""
TIMING_PAST_LEN = 320
"""Cache length the timed forwards run on (a typical prompt plus part of an answer)."""
TIMING_ROUNDS = 5
"""Rounds over all candidates and widths, interleaved so machine noise hits them alike; medians kept."""
PROBE_PAST_LEN = 24
"""Cache length of the exactness probe."""
PROBE_TREE = DraftTree(np.array([5, 9, 11, 2, 7, 3]), np.array([-1, -1, 0, 2, 3, 1]))
"""The probe's tree: a branch at the root and a chain of three under its first child (token ids are
taken modulo the vocabulary)."""
PROBE_SEED = 0
"""Seed of the probe's and the timing's random prompts."""
PACKED_TOLERANCE = {torch.float32: 1e-4}
"""Largest difference a packed backend may show against the model's own forward, relative to the
largest magnitude of the compared tensor (logits, each cache layer's keys and values): float rounding
of differently blocked dot products, summed over the layers."""


@runtime_checkable
class ForwardBackend(Protocol):
    """Runs a model's forwards for verification; holds the model, never writes into it."""

    name: str
    """One of :data:`BACKEND_NAMES`."""
    model: Any
    """The wrapped ``transformers`` causal LM."""
    layout: ModelLayout
    """The model's attention layout, read once."""
    device: torch.device
    """Where the model's weights are: inputs are built there."""
    exact: bool
    """Runs the model's own kernels: its logits must equal the model's forward bitwise."""
    key: str
    """What its latency calibration is cached under (the name, and whatever else changes its speed)."""

    def prefill(self, cache: Any, token_ids: np.ndarray) -> None:
        """Feed ``token_ids`` (int[L]) into an empty ``cache`` with the model's own causal mask."""
        ...

    def __call__(
        self,
        cache: Any,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Logits (n, V) in the model's dtype of ``input_ids`` (1, n) at ``position_ids`` (1, n) on
        top of ``cache``, with the additive tree ``mask`` (1, 1, n, past + n)."""
        ...

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Several requests' segments, each on its own cache, in one step: per segment its logits
        (n, V) as :meth:`__call__` gives them, or None where the segment wants none (a prefill chunk)."""
        ...


class ModelForward:
    """The model's own forward (``name == "model"``): the reference every other backend is probed
    against."""

    name = "model"
    exact = True

    def __init__(self, model: Any, layout: ModelLayout | None = None) -> None:
        self.model = model
        self.layout = layout or model_layout(model)
        self.device = torch.device(model.device)

    @torch.inference_mode()
    def prefill(self, cache: Any, token_ids: np.ndarray) -> None:
        if len(token_ids) == 0:
            return
        input_ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)[None, :]
        kwargs: dict[str, Any] = {self.layout.cache_argument: cache}
        if self.layout.logits_to_keep:
            kwargs["logits_to_keep"] = 1  # no logits are needed: the root is scored by the first step
        self.model(
            input_ids=input_ids,
            position_ids=torch.arange(input_ids.shape[1], device=self.device)[None, :],
            use_cache=True,
            **kwargs,
        )

    @torch.inference_mode()
    def __call__(
        self,
        cache: Any,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor],
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.layout.cache_argument: cache},
        )
        return out.logits[0]

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """One forward per segment (the model's forward takes one cache); backends that verify
        several requests in one pass override it."""
        out: list[torch.Tensor | None] = []
        for seg in segments:
            logits = self(seg.cache, seg.input_ids, seg.position_ids, seg.mask)
            out.append(logits if seg.logits else None)
        return out

    @property
    def key(self) -> str:
        """What a latency calibration of this backend is cached under: its name."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={type(self.model).__name__})"


class DirectBackend(ModelForward):
    """:class:`~restspec.decode.direct.DirectForward` for the tree forwards: ``direct`` with the model's
    own linears, ``direct-packed`` or ``direct-blocks`` with those ``kernels`` (CPU only). Raises
    ``ModelError`` for a model that is not a Llama-family decoder or whose layers mix sliding and full
    attention."""

    def __init__(self, model: Any, kernels: GroupKernels | None = None, layout: ModelLayout | None = None):
        super().__init__(model, layout)
        if self.layout.hybrid:
            raise ModelError("the direct forward takes one mask; this model mixes sliding and full layers")
        try:
            self.direct = DirectForward(model, kernels)
        except AttributeError as exc:
            raise ModelError(f"{type(model).__name__} is not a Llama-family decoder: {exc}") from exc
        self.name = kernels.backend_name if kernels is not None else "direct"
        self.exact = kernels is None

    def __call__(
        self,
        cache: Any,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor],
    ) -> torch.Tensor:
        return self.direct(cache, input_ids, position_ids, mask)  # type: ignore[arg-type]

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Every segment in one pass: the weights are read once for all rows, attention runs per
        segment on its own cache (:meth:`~restspec.decode.direct.DirectForward.batch`)."""
        return self.direct.batch(segments)


class SplitBackend(ModelForward):
    """A split backend (:data:`SPLITS`): one direct forward (``narrow``) below ``wide_from`` inputs,
    another (``wide``) from there on, so that plain steps and wide trees or batches each run on their
    faster kernels (oneDNN's packed matmuls lose to MKL on one row but win on many on some CPUs; the
    block kernel wins on few rows and loses on many with AVX2). Its probe is both members'."""

    exact = False

    def __init__(self, narrow: DirectBackend, wide: DirectBackend, wide_from: int) -> None:
        if wide_from < 2:
            raise ValueError(f"wide_from={wide_from} must be >= 2 (else it is {wide.name!r} alone)")
        names = {members: name for name, members in SPLITS.items()}
        if (narrow.name, wide.name) not in names:
            raise ValueError(f"no split backend runs {narrow.name!r} narrow and {wide.name!r} wide")
        super().__init__(narrow.model, narrow.layout)
        self.name = names[narrow.name, wide.name]
        self.members = (narrow, wide)
        self.wide_from = int(wide_from)

    def __call__(
        self,
        cache: Any,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | dict[str, torch.Tensor],
    ) -> torch.Tensor:
        return self._member(input_ids.shape[1])(cache, input_ids, position_ids, mask)

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        return self._member(sum(seg.width for seg in segments)).forward_batch(segments)

    def _member(self, width: int) -> DirectBackend:
        narrow, wide = self.members
        return wide if width >= self.wide_from else narrow

    @property
    def key(self) -> str:
        """The name and the split width: a latency curve measured with one split does not fit another."""
        return f"{self.name}@{self.wide_from}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(wide_from={self.wide_from}, model={type(self.model).__name__})"


def split_width(narrow: dict[int, float], wide: dict[int, float]) -> int | None:
    """The least timed width from which ``wide`` is faster than ``narrow`` at every timed width on
    (median seconds by width), if ``narrow`` wins below it; else None (one of the two is best alone)."""
    widths = sorted(narrow)
    for i, width in enumerate(widths):
        if all(wide[w] < narrow[w] for w in widths[i:]):
            return width if i > 0 else None
    return None


def candidates(model: Any, device: torch.device | str | None = None) -> list[ForwardBackend]:
    """Every backend that can run ``model`` on ``device`` (default: the model's), in the order of
    :data:`BACKEND_NAMES`: the model's own forward; for Llama-family decoders the direct one, and on the
    CPU in float32 the direct-packed one where oneDNN is built in and the packed copy fits in memory,
    and the direct-blocks one where some weights are block-encoded and the kernel builds."""
    own = ModelForward(model)
    _check_device(own, device)
    found: list[ForwardBackend] = [own]
    with contextlib.suppress(ModelError):  # not a Llama-family decoder: no direct backends
        found.append(DirectBackend(model, None, own.layout))
    if len(found) == 2:
        for kernels in (_packed_weights(own), _block_weights(own)):
            if kernels is not None:
                found.append(DirectBackend(model, kernels, own.layout))
    return found


def parse_backend(name: str) -> tuple[str, int | None]:
    """``name`` as (one of :data:`BACKEND_NAMES`, split width or None): ``direct-split@8`` is the split
    backend turning to the packed kernels at 8 inputs (a backend's :attr:`~ForwardBackend.key`);
    ``ModelError`` for anything else."""
    base, at, width = name.partition("@")
    if base in BACKEND_NAMES and not at:
        return base, None
    if base in SPLITS and width.isdigit() and int(width) >= 2:
        return base, int(width)
    raise ModelError(
        f"backend {name!r} is unknown; use 'auto' or one of {', '.join(BACKEND_NAMES)} "
        "(direct-split@N, direct-blocks-split@N: the packed kernels from N >= 2 inputs on)"
    )


def backend_by_name(model: Any, name: str, *, wide_from: int = 2) -> ForwardBackend:
    """The backend ``name`` (:func:`parse_backend`) of ``model``; ``ModelError`` if it cannot run this
    model here. ``wide_from``: where a split backend turns to its wide member
    (:func:`choose_backend` measures it), unless the name says (``direct-split@N``)."""
    name, width = parse_backend(name)
    own = ModelForward(model)
    if name == "model":
        return own
    try:
        if name in SPLITS:
            narrow, wide = (backend_by_name(model, member) for member in SPLITS[name])
            return SplitBackend(narrow, wide, wide_from if width is None else width)  # type: ignore[arg-type]
        if name == "direct":
            return DirectBackend(model, None, own.layout)
        kernels = _packed_weights(own) if name == "direct-packed" else _block_weights(own)
        if kernels is not None:
            return DirectBackend(model, kernels, own.layout)
    except ModelError:
        pass
    raise ModelError(
        f"backend {name!r} cannot run {type(model).__name__} ({dtype_name(model)} on {model.device}); "
        "use 'auto' or 'model'"
    )


def _packed_weights(own: ModelForward) -> PackedWeights | None:
    """The model's packed weights where packed backends apply (the CPU), else None."""
    return PackedWeights.of(own.model) if own.device.type == "cpu" else None


def _block_weights(own: ModelForward) -> BlockWeights | None:
    """The model's block-encoded weights where the block backend applies (the CPU), else None."""
    return BlockWeights.of(own.model) if own.device.type == "cpu" else None


def _check_device(backend: ModelForward, device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type != backend.device.type:
        raise ModelError(
            f"the model is on {backend.device} but device={str(device)!r} was asked for; "
            f"load it there: load_model(..., device={str(device)!r})"
        )


# ---- the exactness probe ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """How a backend's forward compared with the model's own on :data:`PROBE_TREE`."""

    passed: bool
    max_error: float
    """Largest difference seen, relative to the compared tensor's largest magnitude (0.0: bitwise)."""
    reason: str = ""
    """Why it failed; empty when it passed."""


def _probe_run(backend: ForwardBackend) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of :data:`PROBE_TREE` on a :data:`PROBE_PAST_LEN`-token cache, and the cache's rows."""
    vocab = int(backend.model.get_input_embeddings().num_embeddings)
    prompt = np.random.default_rng(PROBE_SEED).integers(0, vocab, size=PROBE_PAST_LEN + 1)
    tree = DraftTree(PROBE_TREE.tokens % vocab, PROBE_TREE.parents)
    cache = new_cache()
    backend.prefill(cache, prompt[:-1])
    ids, positions, mask = tree_inputs(int(prompt[-1]), tree, PROBE_PAST_LEN, backend.layout, backend.device)
    with torch.inference_mode():
        logits = backend(cache, ids, positions, mask)
    return logits, [t for layer in cache.layers for t in (layer.keys, layer.values)]


def probe(backend: ForwardBackend, reference: ForwardBackend | None = None) -> ProbeResult:
    """Compare ``backend`` with ``reference`` (default: the model's own forward) on one small tree.

    The rule: a backend that runs the model's own kernels (``backend.exact``: ``model``, ``direct``)
    must give bitwise equal logits and cache rows. A packed backend runs other matmul kernels, so it
    must give the same argmax in every logits row, and logits and cache rows within
    :data:`PACKED_TOLERANCE` (relative to each tensor's largest magnitude) of the reference; packed
    backends exist for float32 only. An error inside the backend's forward fails the probe."""
    reference = reference or ModelForward(backend.model, backend.layout)
    if isinstance(backend, SplitBackend):  # each member scores the trees of its widths
        results = [probe(member, reference) for member in backend.members]
        return next((r for r in results if not r.passed), max(results, key=lambda r: r.max_error))
    want_logits, want_rows = _probe_run(reference)
    try:
        got_logits, got_rows = _probe_run(backend)
    except Exception as exc:  # a layer this backend does not know how to run
        return ProbeResult(False, float("inf"), f"its forward failed: {exc!r}")
    pairs = [(got_logits, want_logits), *zip(got_rows, want_rows, strict=True)]
    if any(a.shape != b.shape for a, b in pairs):
        return ProbeResult(False, float("inf"), "its logits or cache rows have other shapes")
    error = max(relative_error(a, b) for a, b in pairs)
    if backend.exact:
        same = all(torch.equal(a, b) for a, b in pairs)
        return ProbeResult(same, error, "" if same else f"not bitwise equal (relative error {error:.2e})")
    tolerance = PACKED_TOLERANCE.get(want_logits.dtype)
    if tolerance is None:
        return ProbeResult(False, error, f"no tolerance is defined for {want_logits.dtype}")
    if not torch.equal(got_logits.argmax(-1), want_logits.argmax(-1)):
        return ProbeResult(False, error, "another argmax in some logits row")
    if error > tolerance:
        return ProbeResult(False, error, f"relative error {error:.2e} > {tolerance:.0e}")
    return ProbeResult(True, error)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference of ``got`` from ``want``, relative to ``want``'s largest magnitude (the
    probe's measure, held to :data:`PACKED_TOLERANCE`)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got.to(want.dtype) - want).abs().max()) if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


# ---- timing and the choice ---------------------------------------------------------------------------


def time_backends(
    backends: Sequence[ForwardBackend],
    widths: Sequence[int] = TIMING_WIDTHS,
    *,
    past_len: int = TIMING_PAST_LEN,
    rounds: int = TIMING_ROUNDS,
) -> dict[str, dict[int, float]]:
    """Median seconds of one tree forward per backend and width, on a ``past_len``-token cache: every
    round times every backend at every width (interleaved, so load from elsewhere hits all alike)."""
    from restspec.decode.budget import ForwardLatencyProbe

    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    probes = [ForwardLatencyProbe(b, past_len=past_len) for b in backends]
    for p in probes:
        p(max(widths))  # warm-up at the widest shape
    samples: dict[str, dict[int, list[float]]] = {b.name: {w: [] for w in widths} for b in backends}
    for _ in range(rounds):
        for width in widths:
            for backend, p in zip(backends, probes, strict=True):
                samples[backend.name][width].append(p(width))
    return {
        name: {w: statistics.median(s) for w, s in by_width.items()} for name, by_width in samples.items()
    }


@dataclass(frozen=True)
class BackendChoice:
    """What :func:`choose_backend` measured: the kept backend's name, each timed candidate's median
    seconds per width, and why the others were left out."""

    name: str
    timings: dict[str, dict[int, float]]
    rejected: dict[str, str]
    wide_from: int = 2
    """Where the split backend ``name`` turns to its wide member (unused when ``name`` is no split)."""

    def to_json(self) -> dict:
        return {
            "backend": self.name,
            "wide_from": self.wide_from,
            "timings_ms": {
                n: {str(w): round(s * 1e3, 3) for w, s in t.items()} for n, t in self.timings.items()
            },
            "rejected": self.rejected,
        }

    @classmethod
    def from_json(cls, data: dict) -> BackendChoice:
        timings = {n: {int(w): ms / 1e3 for w, ms in t.items()} for n, t in data["timings_ms"].items()}
        return cls(str(data["backend"]), timings, dict(data.get("rejected", {})), int(data["wide_from"]))


def fastest(backends: Sequence[ForwardBackend], timings: dict[str, dict[int, float]]) -> ForwardBackend:
    """Of ``backends`` (the model's own forward first) those whose median time at every width of
    :data:`TIMING_WIDTHS` is at most the model's own, the one with the least total over those widths;
    a tie goes to the least total over every timed width (so a split whose members part beyond those
    widths beats its narrow member alone)."""
    own = timings[backends[0].name]
    widths = [w for w in own if w in TIMING_WIDTHS]
    eligible = [b for b in backends if all(timings[b.name][w] <= own[w] for w in widths)]
    return min(
        eligible,
        key=lambda b: (sum(timings[b.name][w] for w in widths), sum(timings[b.name].values())),
    )


def choice_path(model: Any, name: str | None = None) -> Path:
    """``$RESTSPEC_CACHE/backend/<model>-<dtype>-<hash>.json``: the cached choice for this machine (CPU,
    cores, threads, torch and transformers versions), device, model (``name``, default the model's
    ``name_or_path`` or class, and its config) and dtype."""
    import transformers

    from restspec.datastore.default import model_cache_file
    from restspec.decode.budget import device_key, machine_key

    device = torch.device(model.device)
    label = name or Path(str(getattr(model, "name_or_path", "") or "")).name or type(model).__name__
    blob = json.dumps(
        {
            "machine": machine_key(),
            "device": device_key(device),
            "transformers": transformers.__version__,
            "config": model.config.to_json_string(use_diff=False) if name is None else "",
            "version": CHOICE_VERSION,
        },
        sort_keys=True,
    )
    return model_cache_file("backend", label, dtype_name(model), blob, ".json")


def choose_backend(
    model: Any,
    device: torch.device | str | None = None,
    *,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    refresh: bool = False,
) -> ForwardBackend:
    """The fastest backend of ``model`` on ``device`` (default: where the model is) that passes the
    exactness probe (:func:`probe`), measured once and cached (:func:`choice_path`; ``name`` is the
    model's cache name, e.g. :attr:`restspec.models.LoadedModel.name`).

    Every candidate (:func:`candidates`) is probed, and those that pass are timed at
    :data:`TIMING_WIDTHS` and :data:`BATCH_WIDTHS` on a :data:`TIMING_PAST_LEN`-token cache
    (:func:`time_backends`); a split backend joins them where its members each win on one side
    (:func:`split_width`). Of those no slower than the model's own forward at any width of
    :data:`TIMING_WIDTHS` (so that neither plain decoding, all one input wide, nor wide trees lose to
    ``model.generate``), the one with the least total of median times over those widths is kept, ties
    going to the least total over the batch widths too (:func:`fastest`). A cached choice is probed
    again before use (cheap), and the choice is made again if it fails or no longer applies. A choice
    timed while other work competed for the CPU (:data:`~restspec.decode.budget.BUSY_OTHER_CORES`) is
    used but not cached: timings on a busy 2-core machine ran 60 times slow and kept the stock kernels
    up to 16 inputs where the packed ones were 1.5x faster from 4 on (the same machine, quiet).
    ``progress`` gets a line per phase; ``refresh`` measures again."""
    from restspec.decode.budget import cpu_snapshot, measured_while_busy

    path = choice_path(model, name)
    if not refresh and path.is_file():
        try:
            cached = BackendChoice.from_json(json.loads(path.read_text(encoding="utf-8")))
            backend = backend_by_name(model, cached.name, wide_from=cached.wide_from)
            _check_device(backend, device)  # type: ignore[arg-type]
            if backend.name == "model" or probe(backend).passed:
                return backend
        except (ValueError, KeyError, TypeError, ModelError):
            pass  # unreadable or stale: choose again
    found = candidates(model, device)
    if progress is not None:
        progress(f"choosing a forward backend among {', '.join(b.name for b in found)} (once per machine)")
    passing: list[ForwardBackend] = []
    rejected: dict[str, str] = {}
    for backend in found:
        result = probe(backend) if backend.name != "model" else ProbeResult(True, 0.0)
        if result.passed:
            passing.append(backend)
        else:
            rejected[backend.name] = result.reason
    start = cpu_snapshot()
    timings = time_backends(passing, TIMING_WIDTHS + BATCH_WIDTHS) if len(passing) > 1 else {}
    for split in _splits(passing, timings):
        narrow, wide = (timings[m.name] for m in split.members)
        timings[split.name] = {w: min(narrow[w], wide[w]) for w in narrow}
        passing.append(split)
    best = fastest(passing, timings) if timings else passing[0]
    wide_from = best.wide_from if isinstance(best, SplitBackend) else 2
    choice = BackendChoice(best.name, timings, rejected, wide_from)
    busy = bool(timings) and measured_while_busy(start)
    if progress is not None:
        progress(
            f"forward backend: {best.name}"
            + (f" ({_summary(timings)})" if timings else "")
            + (": timed while other work ran, chosen again next time" if busy else "")
        )
    if busy:
        return best
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(choice.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return best


def _splits(passing: Sequence[ForwardBackend], timings: dict[str, dict[int, float]]) -> list[SplitBackend]:
    """The split backends (:data:`SPLITS`) whose members both passed the probe and each are faster at
    some timed widths (the narrow member on the narrow side)."""
    found = {b.name: b for b in passing}
    splits = []
    for narrow_name, wide_name in SPLITS.values():
        narrow, wide = found.get(narrow_name), found.get(wide_name)
        if isinstance(narrow, DirectBackend) and isinstance(wide, DirectBackend):
            width = split_width(timings[narrow.name], timings[wide.name])
            if width is not None:
                splits.append(SplitBackend(narrow, wide, width))
    return splits


def _summary(timings: dict[str, dict[int, float]]) -> str:
    """``model 60/80/95 ms, direct 55/75/90 ms`` over the timed widths."""
    return ", ".join(
        f"{n} " + "/".join(f"{s * 1e3:.0f}" for s in t.values()) + " ms" for n, t in timings.items()
    )
