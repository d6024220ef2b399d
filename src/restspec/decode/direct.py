"""A direct forward for Llama-family decoders: the same operations as transformers' forward, without
its per-call machinery.

A verification forward over a few rows on a small CPU is short, and a good part of it is Python:
transformers' model, decoder-layer, attention and MLP modules each go through ``nn.Module.__call__``,
output-capturing decorators, attention-interface dispatch and cache bookkeeping, once per layer.
:class:`DirectForward` runs the same tensor operations as ``LlamaModel`` / ``Qwen2Model`` /
``MistralModel`` in one loop over the layers' weights, reading the model and never writing it:

- q/k/v (and gate/up) are computed by one call, used as views of its output: the group matmul of
  the given kernels (packed weights of :mod:`restspec.decode.kernels`, block-encoded weights of
  :mod:`restspec.decode.blocks`), else ``F.linear`` on each module's
  weights, joined (the linears' arithmetic without ``nn.Module.__call__``: worth 2-3 ms a forward of
  210 linears on a small CPU);
- the norms' weights are read once, and their float32 casts (no-ops) skipped;
- the rotary embedding is applied to q and k in one pass over their joint view;
- attention is the same ``F.scaled_dot_product_attention`` call on the same cache layers, over the
  key/value heads directly (``enable_gqa``) instead of copies repeated per query head.

With the stock linears each element goes through the same arithmetic in the same order, so the logits
are bitwise those of the model's own forward. That is not assumed:
:func:`restspec.decode.backends.choose_backend` keeps a direct forward only after a probe found it
equal to the model's own forward (a model with extra parts, e.g. Qwen3's q/k norms or Gemma's scaled
embeddings, fails the probe and keeps its own forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from restspec.decode.verify import Segment


Linear = Callable[[torch.Tensor], torch.Tensor]
"""One or more linears that read the same input, as one function: their outputs side by side."""


class GroupKernels(Protocol):
    """Kernels serving groups of linears (:class:`~restspec.decode.kernels.PackedWeights`,
    :class:`~restspec.decode.blocks.BlockWeights`)."""

    backend_name: str
    """The backend that runs the direct forward on them."""

    def group_of(self, modules: list[torch.nn.Linear]) -> Any | None:
        """The group (with a ``matmul``) whose members are exactly ``modules``, or None."""
        ...


def _linear(kernels: GroupKernels | None, *modules: torch.nn.Linear) -> Linear:
    """``modules`` (linears reading the same input) as one function of the input: their group's one
    matmul where the kernels hold them as one group, each member's matmul where they hold them apart, else
    ``F.linear`` on their own weights (the arithmetic of calling them, without the module machinery)."""
    group = kernels.group_of(list(modules)) if kernels is not None else None
    if group is not None:
        return group.matmul
    singles = [kernels.group_of([m]) for m in modules] if kernels is not None else [None]
    if all(g is not None for g in singles):
        parts: list[Linear] = [g.matmul for g in singles]  # type: ignore[union-attr]
    else:
        parts = [partial(F.linear, weight=m.weight, bias=m.bias) for m in modules]
    if len(parts) == 1:
        return parts[0]
    return lambda x: torch.cat([f(x) for f in parts], dim=-1)


def _rms_norm(weight: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``, operation for operation (its casts are no-ops on float32)."""
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def norm_parts(module: Any) -> tuple[torch.Tensor, float]:
    """An RMS norm's weight and epsilon (``variance_epsilon`` in Llama's norm, ``eps`` in others), read
    once."""
    eps = getattr(module, "variance_epsilon", None)
    return module.weight, float(module.eps if eps is None else eps)


class _Block(NamedTuple):
    """One decoder layer's parts and sizes, read once."""

    in_norm: tuple[torch.Tensor, float]
    qkv: Linear
    q_size: int
    q_heads: int
    k_size: int
    head_dim: int
    scaling: float
    gqa: dict[str, bool]
    """``enable_gqa`` for the attention call where key/value heads are fewer than query heads."""
    o_proj: Linear
    mlp_norm: tuple[torch.Tensor, float]
    gate_up: Linear
    gate_size: int
    act: Any
    down: Linear


_Span = tuple[int, int, Any, torch.Tensor, bool]
"""(start, end, cache, mask, causal): one request's rows of a batched forward; causal: the mask is the
causal mask continuing the cache (:attr:`~restspec.decode.verify.Segment.causal`)."""


class DirectForward:
    """The decoder of a Llama-family ``*ForCausalLM`` (``model.model.layers`` of pre-norm attention
    + gated MLP blocks, rotary positions, tied or untied LM head), run layer by layer.

    ``kernels``: the model's packed or block-encoded weights, whose group matmuls then serve every
    linear they hold.
    The weight and norm tensors are read once, here (changes in place are seen, replaced parameters
    are not: build it again). Raises ``AttributeError`` for a model without those parts."""

    def __init__(self, model: Any, kernels: GroupKernels | None = None) -> None:
        decoder = model.model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = norm_parts(decoder.norm)
        self.lm_head = _linear(kernels, model.lm_head)
        self.layers = []
        for layer in decoder.layers[: model.config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Block(
                    in_norm=norm_parts(layer.input_layernorm),
                    qkv=_linear(kernels, attn.q_proj, attn.k_proj, attn.v_proj),
                    q_size=attn.q_proj.out_features,
                    q_heads=attn.q_proj.out_features // attn.head_dim,
                    k_size=attn.k_proj.out_features,
                    head_dim=attn.head_dim,
                    scaling=attn.scaling,
                    gqa={"enable_gqa": True} if attn.num_key_value_groups > 1 else {},
                    o_proj=_linear(kernels, attn.o_proj),
                    mlp_norm=norm_parts(layer.post_attention_layernorm),
                    gate_up=_linear(kernels, mlp.gate_proj, mlp.up_proj),
                    gate_size=mlp.gate_proj.out_features,
                    act=mlp.act_fn,
                    down=_linear(kernels, mlp.down_proj),
                )
            )
        make_decoder = getattr(kernels, "decoder", None)
        self.decoder = make_decoder(model) if make_decoder is not None else None
        """All layers in one call of the kernels' own (:class:`~restspec.decode.blocks.BlockDecoder`),
        where they have one for this model; else the loop below."""

    @torch.inference_mode()
    def __call__(
        self, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (n, V) of ``input_ids`` (1, n) at ``position_ids`` (1, n) on top of ``cache``, with
        the additive ``mask`` (1, 1, n, past + n)."""
        x = self._layers(input_ids, position_ids, [(0, input_ids.shape[1], cache, mask, False)])
        return self.lm_head(_rms_norm(*self.norm, x))[0]

    @torch.inference_mode()
    def batch(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Several requests in one pass: their rows side by side through every linear (the weights are
        read once), attention per segment on its own cache with its own mask, the LM head only over
        the rows of segments that want logits. Row for row the same operations as :meth:`__call__`
        on each segment alone."""
        input_ids = torch.cat([seg.input_ids for seg in segments], dim=1)
        position_ids = torch.cat([seg.position_ids for seg in segments], dim=1)
        spans: list[_Span] = []
        start = 0
        for seg in segments:
            spans.append((start, start + seg.width, seg.cache, seg.mask, seg.causal))  # type: ignore[arg-type]
            start += seg.width
        x = self._layers(input_ids, position_ids, spans)[0]
        wanted = [(a, b) for (a, b, *_), seg in zip(spans, segments, strict=True) if seg.logits]
        if not wanted:
            return [None] * len(segments)
        rows = x if len(wanted) == len(spans) else torch.cat([x[a:b] for a, b in wanted])
        logits = self.lm_head(_rms_norm(*self.norm, rows[None]))[0]
        out: list[torch.Tensor | None] = []
        at = 0
        for seg in segments:
            out.append(logits[at : at + seg.width] if seg.logits else None)
            at += seg.width if seg.logits else 0
        return out

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, spans: list[_Span]) -> torch.Tensor:
        """Hidden states (1, n, d) after the last layer; ``spans``: (start, end, cache, mask) of each
        request's rows, which attend to their own cache only."""
        x = self.embed(input_ids)
        n = input_ids.shape[1]
        cos, sin = self.rotary(x, positions)
        if self.decoder is not None and self.decoder(x, cos, sin, spans):
            return x
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, b in enumerate(self.layers):
            out = b.qkv(_rms_norm(*b.in_norm, x))  # (1, n, q + k + v)
            qk = out[..., : b.q_size + b.k_size].view(1, n, -1, b.head_dim).transpose(1, 2)
            qk = (qk * cos) + (_rotate_half(qk) * sin)
            values = out[..., b.q_size + b.k_size :].view(1, n, -1, b.head_dim).transpose(1, 2)
            parts = [self._attend(b, index, qk[:, :, s:e], values[:, :, s:e], *span) for s, e, *span in spans]
            attn = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            x = x + b.o_proj(attn)
            out = b.gate_up(_rms_norm(*b.mlp_norm, x))  # (1, n, gate + up)
            x = x + b.down(b.act(out[..., : b.gate_size]) * out[..., b.gate_size :])
        return x

    @staticmethod
    def _attend(
        b: _Block,
        index: int,
        qk: torch.Tensor,
        values: torch.Tensor,
        cache: Any,
        mask: torch.Tensor,
        causal: bool,
    ) -> torch.Tensor:
        """One request's attention in layer ``index``: (1, n, heads * head_dim)."""
        n = qk.shape[2]
        keys, values = cache.update(qk[:, b.q_heads :], values, index)
        queries = qk[:, : b.q_heads]
        past = keys.shape[2] - n
        if causal and past < n:
            # a prompt chunk longer than what it continues: the causal kernel over the whole cache, the
            # past's query rows zeros whose outputs are dropped. It skips the half above the diagonal,
            # (past + n)^2 / 2 scores against a mask's n (past + n), and reads no mask
            if past:
                queries = torch.cat([queries.new_zeros(1, b.q_heads, past, b.head_dim), queries], dim=2)
            attn = F.scaled_dot_product_attention(
                queries, keys, values, is_causal=True, scale=b.scaling, **b.gqa
            )[:, :, past:]
        else:
            attn = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=b.scaling, **b.gqa
            )
        return attn.transpose(1, 2).reshape(1, n, -1)
