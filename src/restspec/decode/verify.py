"""Tree verification on any Hugging Face causal LM, through its public forward arguments only.

One forward pass scores ``[root, node 0, ..., node n-1]`` on top of the KV cache: a 4D additive float
mask (0 where a row may attend, the dtype's minimum elsewhere) lets every row see the whole cache and
its own tree ancestors, and explicit ``position_ids`` put node i at ``past_len + depth_i``. With a 4D
mask, ``transformers`` (5.x) hands the mask to the attention kernel as-is, so the model no longer
assumes causality; sliding-window attention is therefore applied here, in the mask.

The cache is a ``DynamicCache`` without config whose layers are :class:`BufferedLayer` (a plain,
non-sliding ``DynamicLayer``) holding ``keys`` / ``values`` of shape (batch=1, kv_heads, T,
head_dim), so that rejected rows can be dropped and accepted rows gathered (:func:`compact_cache`),
also for sliding-window models.

The forward itself is a backend's (:mod:`restspec.decode.backends`): the model's own forward or a faster
one that reproduces it. Inputs, masks and compaction indices are built on the model's device.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from restspec.draft.tree import DraftTree
from restspec.errors import ModelError

if TYPE_CHECKING:
    from restspec.decode.backends import ForwardBackend

_MASKABLE_ATTENTION = ("sdpa", "eager")
_FULL, _SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelLayout:
    """What verification needs to know about a model, read once from its config."""

    dtype: torch.dtype
    """Dtype of the additive mask (the model's dtype)."""
    max_positions: int | None
    """Context length (``max_position_embeddings`` / ``n_positions``), None if unbounded."""
    sliding_window: int | None
    """Window of sliding-attention layers (a key at position k is seen from q iff k > q - window)."""
    hybrid: bool
    """Some layers slide, some do not: the mask is passed as {layer type: mask}."""
    logits_to_keep: bool
    """The forward takes ``logits_to_keep`` (used to skip the LM head on prefill rows)."""
    cache_argument: str
    """The forward's keyword for the KV cache: ``cache`` from transformers 5.24 on, ``past_key_values``
    before (vLLM 0.32 to 0.34 pin transformers below 5.23): ``model(**{cache_argument: cache})``."""
    eos_token_ids: tuple[int, ...]
    """Every end-of-sequence id of the model's generation config."""


def model_layout(model: Any) -> ModelLayout:
    """Read the attention layout of ``model`` (cached on nothing: call once per generator)."""
    config = model.config.get_text_config(decoder=True)
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in _MASKABLE_ATTENTION:
        raise ModelError(
            f"attention implementation {impl!r} cannot take a tree mask; "
            f"load the model with attn_implementation='sdpa' (or one of {_MASKABLE_ATTENTION})"
        )
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        kinds = set(layer_types)
        unknown = kinds - {_FULL, _SLIDING}
        if unknown:
            raise ModelError(f"layer types {sorted(unknown)} are not supported by tree verification")
        if _SLIDING not in kinds:
            window = None
        hybrid = len(kinds) == 2 and window is not None
    else:
        hybrid = False
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    eos_ids = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos).tolist())
    params = inspect.signature(model.forward).parameters
    return ModelLayout(
        dtype=model.dtype,
        max_positions=int(max_positions) if max_positions else None,
        sliding_window=int(window) if window else None,
        hybrid=hybrid,
        logits_to_keep="logits_to_keep" in params,
        cache_argument="cache" if "cache" in params else "past_key_values",
        eos_token_ids=eos_ids,
    )


class _BufferView:
    """A :class:`BufferedLayer`'s ``keys`` or ``values``: the view of its buffer, made on first read or
    write after :meth:`~BufferedLayer.advance` (kept in ``_keys`` / ``_values``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, layer: BufferedLayer | None, owner: type | None = None) -> Any:
        if layer is None:
            return self
        if layer._end is not None:
            layer._views()
        return getattr(layer, self.slot)

    def __set__(self, layer: BufferedLayer, value: torch.Tensor | None) -> None:
        if layer._end is not None:
            layer._views()
        setattr(layer, self.slot, value)


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new rows into a buffer with spare room instead of concatenating.

    ``DynamicLayer.update`` copies the whole cache (``torch.cat``) on every forward, a cost that grows
    with the context. Here ``keys`` / ``values`` are views
    ``buffer[:, :, :length]`` of a (batch, kv_heads, capacity, head_dim) buffer that grows by doubling;
    crops and :func:`compact_cache` slice and write those views, so rows past ``length`` are free.
    The views are made when first read after :meth:`advance` or :meth:`compact`: a writer that fills
    the buffers itself (the block decoder, every layer every step) reads none of them, and making 60
    views took 0.13 ms a step, 1.5 % of a plain one (2-core AMD EPYC).
    """

    GROW_MIN = 256
    """Spare rows allocated at least whenever the buffer grows."""
    _end: int | None = None
    """The buffers' rows the cache holds where ``keys`` / ``values`` are not yet their views."""

    keys = _BufferView()
    values = _BufferView()

    def _views(self) -> None:
        end, self._end = self._end, None
        self._keys = self._key_buffer[:, :, :end]  # (batch, kv_heads, end, head_dim)
        self._values = self._value_buffer[:, :, :end]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None

    def get_seq_length(self) -> int:
        return super().get_seq_length() if self._end is None else self._end

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = key_states.shape[-2]
        keys, values, length = self.reserve(key_states[:, :, :0], value_states[:, :, :0], rows)
        keys[:, :, length : length + rows] = key_states
        values[:, :, length : length + rows] = value_states
        self.advance(length + rows)
        return self.keys, self.values

    def reserve(
        self, key_like: torch.Tensor, value_like: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for ``rows`` more rows (shaped, typed and placed like ``key_like`` / ``value_like``):
        the key and value buffers and the current length, for a writer that fills rows ``length ..
        length + rows - 1`` of the buffers itself and then calls :meth:`advance`."""
        if not self.is_initialized:
            self.lazy_initialization(key_like, value_like)
        length = self.get_seq_length()
        end = length + rows
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._key_buffer = self._grown(self._key_buffer, key_like, length, end)
            self._value_buffer = self._grown(self._value_buffer, value_like, length, end)
        return self._key_buffer, self._value_buffer, length

    def advance(self, end: int) -> None:
        """The cache holds the buffers' first ``end`` rows (after :meth:`reserve` and the writes)."""
        self._end = end

    def compact(self, rows: torch.Tensor | None, start: int, drop: int) -> bool:
        """:func:`compact_cache` on the buffers while their views are not made: rows ``rows`` (None:
        none) moved to ``start``, ``start + 1``, ..., then the last ``drop`` rows dropped; True. False
        (nothing done) where the views are made: compact those."""
        if self._end is None:
            return False
        if rows is not None:
            rows = rows.to(self._key_buffer.device)
            moved = slice(start, start + len(rows))
            self._key_buffer[:, :, moved] = self._key_buffer[:, :, rows]
            self._value_buffer[:, :, moved] = self._value_buffer[:, :, rows]
        self._end -= drop
        return True

    @classmethod
    def _grown(cls, old: torch.Tensor | None, new: torch.Tensor, length: int, end: int) -> torch.Tensor:
        batch, heads, _, dim = new.shape
        capacity = max(2 * end, end + cls.GROW_MIN)
        buffer = new.new_empty((batch, heads, capacity, dim))
        if old is not None and length:
            buffer[:, :, :length] = old[:, :, :length]
        return buffer


def buffered_layers(cache: DynamicCache, count: int) -> list[BufferedLayer] | None:
    """The first ``count`` layers of ``cache`` (of :func:`new_cache`: added where missing), or None where
    one is not a :class:`BufferedLayer`."""
    if len(cache.layers) < count and getattr(cache, "layer_class_to_replicate", None) is BufferedLayer:
        cache.layers.extend(BufferedLayer() for _ in range(count - len(cache.layers)))
    layers = cache.layers[:count]
    if len(layers) < count or not all(type(layer) is BufferedLayer for layer in layers):
        return None
    return layers


def new_cache() -> DynamicCache:
    """An empty cache of :class:`BufferedLayer` (plain, non-sliding layers), which compaction can
    gather from."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = BufferedLayer
    return cache


def tree_attention_bias(
    tree: DraftTree, past_len: int, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """Additive mask (1, 1, n+1, past_len+n+1): 0 where ``tree.attention_mask(past_len)`` is True, the
    dtype's minimum elsewhere; with ``sliding_window`` keys at positions <= q - window are masked too."""
    n = len(tree)
    neg = torch.finfo(dtype).min
    bias = torch.zeros((1, 1, n + 1, past_len + n + 1), dtype=dtype)
    if n:
        # (n+1, n+1) over [root, nodes]: hide everything that is not an ancestor (or self)
        bias[0, 0, :, past_len:].masked_fill_(torch.from_numpy(~tree.ancestor_mask), neg)
    if sliding_window is not None:
        q_pos = torch.from_numpy(tree.position_ids(past_len))  # (n+1,)
        k_pos = torch.cat((torch.arange(past_len), q_pos))  # (past_len+n+1,)
        out_of_window = k_pos[None, :] <= q_pos[:, None] - sliding_window
        bias[0, 0].masked_fill_(out_of_window, neg)
    return bias


def _mask_argument(
    layout: ModelLayout, tree: DraftTree, past_len: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    if layout.hybrid:
        return {
            _FULL: tree_attention_bias(tree, past_len, layout.dtype),
            _SLIDING: tree_attention_bias(tree, past_len, layout.dtype, layout.sliding_window),
        }
    return tree_attention_bias(tree, past_len, layout.dtype, layout.sliding_window)


def tree_inputs(
    root_token: int, tree: DraftTree, past_len: int, layout: ModelLayout, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
    """Input ids (1, n+1) of ``[root_token] + tree``, their position ids (1, n+1) and the tree mask
    (see :func:`tree_attention_bias`), all on ``device``."""
    ids = np.empty(len(tree) + 1, dtype=np.int64)
    ids[0] = root_token
    ids[1:] = tree.tokens
    input_ids = torch.from_numpy(ids)[None, :].to(device)
    position_ids = torch.from_numpy(tree.position_ids(past_len))[None, :].to(device)
    mask = _mask_argument(layout, tree, past_len)
    if isinstance(mask, dict):
        return input_ids, position_ids, {kind: m.to(device) for kind, m in mask.items()}
    return input_ids, position_ids, mask.to(device)


@dataclass(frozen=True, eq=False)
class Segment:
    """One request's part of a batched forward: its inputs on top of its own ``cache``.

    A verification segment is ``[root] + tree`` (:func:`tree_segment`); a prefill chunk is a run of
    prompt tokens, a chain under its first token whose logits nobody reads (:func:`prefill_segment`)."""

    cache: Any
    input_ids: torch.Tensor
    """(1, n) token ids."""
    position_ids: torch.Tensor
    """(1, n) positions."""
    mask: torch.Tensor | dict[str, torch.Tensor]
    """Additive mask (1, 1, n, past + n) (per layer type for hybrid models)."""
    logits: bool
    """Whether the caller reads this segment's logits (False: a prefill chunk)."""
    causal: bool = False
    """Whether ``mask`` is the plain causal mask continuing the cache (a prefill chunk of a model without
    sliding windows), which a backend may apply with a causal attention kernel instead."""

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def tree_segment(
    backend: ForwardBackend, cache: DynamicCache, root_token: int, tree: DraftTree, past_len: int
) -> Segment:
    """``[root_token] + tree`` on top of ``cache`` (``past_len`` tokens), the inputs :func:`forward_tree`
    scores."""
    input_ids, position_ids, mask = tree_inputs(root_token, tree, past_len, backend.layout, backend.device)
    return Segment(cache, input_ids, position_ids, mask, logits=True)


def prefill_segment(
    backend: ForwardBackend, cache: DynamicCache, token_ids: np.ndarray, past_len: int
) -> Segment:
    """Prompt tokens ``token_ids`` (int[n >= 1]) continuing ``cache`` (``past_len`` tokens) causally."""
    tokens = np.asarray(token_ids, dtype=np.int32)
    chain = DraftTree.chain(tokens[1:])
    ids, positions, mask = tree_inputs(int(tokens[0]), chain, past_len, backend.layout, backend.device)
    return Segment(cache, ids, positions, mask, logits=False, causal=backend.layout.sliding_window is None)


@torch.inference_mode()
def prefill(backend: ForwardBackend, cache: DynamicCache, token_ids: np.ndarray) -> None:
    """Feed ``token_ids`` (int[L]) into an empty ``cache`` with the model's own causal mask, through
    ``backend`` (a :class:`~restspec.decode.backends.ForwardBackend`)."""
    backend.prefill(cache, token_ids)


@torch.inference_mode()
def forward_tree(
    backend: ForwardBackend, cache: DynamicCache, root_token: int, tree: DraftTree, past_len: int
) -> torch.Tensor:
    """Score ``[root_token] + tree`` on top of ``cache`` (which holds ``past_len`` tokens) in one forward
    of ``backend`` (a :class:`~restspec.decode.backends.ForwardBackend`).

    Returns the raw logits (n+1, V) in the model's dtype, on its device; row r scores the token after
    input r on its tree path. The cache grows by n+1 rows: call :func:`compact_cache` after acceptance.
    """
    seg = tree_segment(backend, cache, root_token, tree, past_len)
    return backend(seg.cache, seg.input_ids, seg.position_ids, seg.mask)


@torch.inference_mode()
def compact_cache(cache: DynamicCache, past_len: int, path: np.ndarray | list[int], n_nodes: int) -> None:
    """Keep the root and the accepted ``path`` (node indices, root to leaf) of the last verification.

    Before: ``past_len`` tokens + root + ``n_nodes`` tree rows. After: ``past_len + 1 + len(path)``
    tokens. A path that is a prefix of the node order (a chain) is a plain crop, no copy.
    """
    path = np.asarray(path, dtype=np.int64)
    keep = len(path)
    drop = n_nodes - keep
    contiguous = bool(np.array_equal(path, np.arange(keep)))
    if not contiguous:
        src = torch.from_numpy(past_len + 1 + path)  # moved to the cache's device below
        dst = slice(past_len + 1, past_len + 1 + keep)
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding:
            raise ModelError(f"cache layer {type(layer).__name__} cannot be compacted; use new_cache()")
        if not layer.is_initialized:
            continue
        if type(layer) is BufferedLayer and layer.compact(None if contiguous else src, past_len + 1, drop):
            continue
        if not contiguous:
            # (1, kv_heads, T, head_dim): move the accepted rows right after the root
            rows = src.to(layer.keys.device)
            layer.keys[:, :, dst] = layer.keys[:, :, rows]
            layer.values[:, :, dst] = layer.values[:, :, rows]
        if drop:
            end = layer.keys.shape[-2] - drop
            layer.keys = layer.keys[:, :, :end]
            layer.values = layer.values[:, :, :end]
