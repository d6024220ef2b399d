"""Block-encoded weights: float32 linears whose weights are read back exactly from 4-, 8- or 16-bit codes.

A model loaded from a quantized GGUF file (the embedded SmolLM2 is Q4_1, its embedding Q8_0) runs in
float32, but its weights are still what the file's blocks decode to: in every block of 32 inputs of
an output row, ``w = d * q + m`` with a 4-bit ``q`` (Q4_1, Q4_K), or in every block of 32 or 16 inputs
``w = d * q`` with an 8-bit ``q`` (Q8_0, Q4_0, Q5_0; Q6_K, Q3_K in blocks of 16). A one-row forward
on a CPU mostly reads weights (538 MB of float32 for that model, against 111 MB of codes and their
float32 scales), so computing from the codes reads a fifth of the bytes. A checkpoint stored in
bfloat16 (most on the Hugging Face hub) or float16 and loaded in float32 has weights that are 16-bit
values: its codes are those (``w`` itself, no scales), half the bytes.

Nothing is taken from the file: :func:`encode_affine4`, :func:`encode_scaled8` and
:func:`encode_half` find the codes from the float32 weights and keep them only where every weight of
the matrix decodes back **bitwise equal** (the decoding, one exact product and one rounding, is the
one GGUF's loader ran; a 16-bit float converts exactly), so any model whose weights lie on such a
grid qualifies and no other does. The kernel (``blocks.c``, built
once per machine with the C compiler, ``-O3 -march=native``, on torch's OpenMP threads) decodes each
weight in registers (for more input rows than one tile of registers holds, once per chunk of inputs into
a buffer that every tile of rows then reads) and multiplies it with the same float32 arithmetic as a
float32 matmul; each row sums its products in the same order at every width, so a row's outputs do
not depend on the rows beside it. Only the order of the sums differs from other kernels', as between
any two float32 matmul kernels, so
:func:`restspec.decode.backends.choose_backend` probes and times it like the packed kernels
(``direct-blocks``) and keeps it only where it passes and is faster.

Where every linear of every layer is block-encoded and the layers are plain Llama-family ones,
:class:`BlockDecoder` runs all of them in one C call: norms, rotary positions, the cache writes,
attention and the gated MLP around the kernel, without the thousand-odd torch operations (10-15 ms on a
small CPU) of a layer-by-layer forward.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F

from restspec.decode.direct import norm_parts
from restspec.decode.kernels import GroupIndex, cpu_float32_linears, joined_bias, shared_input_groups

log = logging.getLogger(__name__)

BLOCK = 32
"""Inputs per block of the 4-bit encoding and the first 8-bit one (GGUF's Q4_1, Q4_K, Q8_0, Q4_0, Q5_0)."""
SCALED_BLOCKS = (BLOCK, 16)
"""Inputs per block of the 8-bit encodings, tried in order (16: Q6_K and Q3_K's scales)."""
AFFINE_BITS = 17
"""Significant bits of ``d`` in the 4-bit encoding: a float16 times a 6-bit integer at most (Q4_K's
scales; Q4_1's float16 values are on that grid too), so ``d * q`` is exact in float32."""

LANES = 16
"""Output rows decoded side by side (one vector of 16 floats); a matrix's rows must be a multiple."""
SOURCE = "blocks.c"
COMPILE_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-Wno-unknown-pragmas", "-Wno-psabi"]
"""For this machine's vector units; fused multiply-adds allowed (the linears' own are explicit, so that
every tile rounds alike)."""
COMPILE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Encoded:
    """One matrix (N, K) as codes in the kernel's layout: output rows in groups of :data:`LANES`."""

    codes: np.ndarray
    """uint8 (N/16, K/2, 16) for affine4 (two codes a byte, the even input low), (N/16, K, 16) for scaled8,
    (N/16, K, 32) for bf16 and f16 (16 weights of an input as uint16, viewed as bytes)."""
    scales: np.ndarray | None
    """float32 (N/16, K/block, 16): d per block and row; None for bf16 and f16."""
    offsets: np.ndarray | None
    """float32 (N/16, K/32, 16): m per block and row (affine4), else None."""
    half: str | None = None
    """Codes that are the weights as 16-bit floats: ``"bf16"`` (their upper 16 bits) or ``"f16"``."""

    @property
    def kind(self) -> str:
        """``"affine4"`` (w = d * q + m: it has offsets), ``"scaled8"`` (w = d * q), or ``"bf16"`` /
        ``"f16"`` (w itself, no scales)."""
        return self.half or ("scaled8" if self.offsets is None else "affine4")

    @property
    def block(self) -> int:
        """Inputs per block (of the scales, and of the kernel's sums): 32, or 16 (scaled8 only)."""
        if self.scales is None:
            return BLOCK
        inputs = self.codes.shape[1] * (2 if self.kind == "affine4" else 1)
        return inputs // self.scales.shape[1]

    @staticmethod
    def join(parts: list[Encoded]) -> Encoded | None:
        """Matrices of one encoding and input size stacked along their outputs (a layer's q/k/v), or
        None where they differ in either."""
        first = parts[0]
        if any(
            p.kind != first.kind or p.block != first.block or p.codes.shape[1:] != first.codes.shape[1:]
            for p in parts
        ):
            return None
        scales = None if first.scales is None else np.concatenate([p.scales for p in parts])  # type: ignore[misc]
        offsets = None if first.offsets is None else np.concatenate([p.offsets for p in parts])  # type: ignore[misc]
        return Encoded(np.concatenate([p.codes for p in parts]), scales, offsets, first.half)


def _blocks(weight: np.ndarray, block: int = BLOCK) -> np.ndarray | None:
    """``weight`` (N, K) float32 as (N * K/block, block), or None where its shape does not fit the kernel."""
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    n, k = weight.shape
    if n == 0 or k == 0 or n % LANES or k % BLOCK:
        return None
    return np.ascontiguousarray(weight).reshape(-1, block)


def _lanes(per_row: np.ndarray) -> np.ndarray:
    """(N, X, ...) as (N/16, X, 16, ...): 16 output rows side by side."""
    n = per_row.shape[0]
    return np.ascontiguousarray(np.moveaxis(per_row.reshape(n // LANES, LANES, *per_row.shape[1:]), 1, 2))


@nb.njit(cache=True, inline="always")
def _same(a: np.float32, b: np.float32) -> bool:
    """Equal bitwise (for finite floats: equal and of the same sign, so -0.0 differs from 0.0)."""
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


@nb.njit(cache=True, inline="always")
def _snap(x: float, bits: int) -> float:
    """``x`` (finite, not 0) rounded to ``bits`` significant bits."""
    step = 2.0 ** (math.frexp(x)[1] - bits)  # x = f * 2**exponent, 0.5 <= |f| < 1
    return np.rint(x / step) * step


@nb.njit(cache=True, inline="always")
def _affine_block(block: np.ndarray, d: np.float32, low: np.float32, codes: np.ndarray) -> bool:
    """Codes of ``block`` with ``d * q + low`` equal to every weight bitwise, into ``codes``."""
    for j in range(BLOCK):
        q = np.rint((block[j] - low) / d) + np.float32(0.0)  # as in _encode_scaled8: no -0.0 code
        if not (0 <= q <= 15) or not _same(d * q + low, block[j]):
            return False
        codes[j] = np.uint8(q)
    return True


@nb.njit(cache=True)
def _encode_affine4(blocks: np.ndarray, codes: np.ndarray, scales: np.ndarray, lows: np.ndarray) -> bool:
    """Per block: d (``d * q`` exact in float32) and low with ``d * q + low`` the block's weights
    bitwise: low is the lowest weight (code 0) and d the difference of the extremes over their codes'
    (the span: Q4_1's is always 15, Q4_K's codes need not reach 15; widest first), snapped to
    :data:`AFFINE_BITS` significant bits."""
    for i in range(blocks.shape[0]):
        block = blocks[i]
        low, high = block.min(), block.max()
        lows[i] = low
        if low == high:  # constant: d = 0
            scales[i] = np.float32(0.0)
            codes[i] = 0
            if not _same(np.float32(0.0) + low, low):
                return False
            continue
        if not math.isfinite(float(high) - float(low)):
            return False
        for span in range(15, 0, -1):
            d = np.float32(_snap((float(high) - float(low)) / span, AFFINE_BITS))
            if _affine_block(block, d, low, codes[i]):
                scales[i] = d
                break
        else:
            return False
    return True


SCALED_LARGEST_CODES = (127, 8, 16, *(c for c in range(32, 0, -1) if c not in (8, 16)))
"""The code of a block's largest magnitude in the scaled encodings tried, in order: Q8_0 (127),
Q4_0 (-8, kept as 8-bit codes), Q5_0 (-16), then 32 down to 1 (Q6_K's codes are -32..31, Q3_K's
-4..3, and their scales are rounded: a block's largest weight need not have the largest code)."""
_SIGNED_LARGEST = np.array([sign * c for c in SCALED_LARGEST_CODES for sign in (1, -1)], np.float32)


@nb.njit(cache=True, inline="always")
def _scaled_block(block: np.ndarray, d: np.float32, codes: np.ndarray) -> bool:
    """Codes of ``block`` with ``d * q`` equal to every weight bitwise, into ``codes``."""
    for j in range(block.shape[0]):
        if d == 0:  # a block of zeros (a sub-block scale of 0): -0.0 where 0 times a negative code
            q = np.float32(-1.0) if math.copysign(1.0, block[j]) < 0 else np.float32(0.0)
        else:  # + 0.0: a code is an integer, so -0.0 (a zero weight over a negative d) is 0.0
            q = np.rint(block[j] / d) + np.float32(0.0)
        if not (-128 <= q <= 127) or not _same(d * q, block[j]):
            return False
        codes[j] = np.int8(q)
    return True


@nb.njit(cache=True)
def _encode_scaled8(blocks: np.ndarray, codes: np.ndarray, scales: np.ndarray, largest: np.ndarray) -> bool:
    """Per block: d = the largest magnitude / one of ``largest`` (signed: the sign of ``d * 0`` is
    d's) and codes with ``d * q`` the weights bitwise."""
    for i in range(blocks.shape[0]):
        top = np.abs(blocks[i]).max()
        for code in largest:
            d = top / np.float32(code)
            if _scaled_block(blocks[i], d, codes[i]):
                scales[i] = d
                break
        else:
            return False
    return True


def encode_affine4(weight: np.ndarray) -> Encoded | None:
    """4-bit codes, and per block of 32 a float32 ``d`` (of at most :data:`AFFINE_BITS` bits) and ``m``,
    with ``d * q + m == weight`` bitwise for every weight; None if some block has none (the weights are
    not on such a grid)."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    codes = np.empty(blocks.shape, dtype=np.uint8)
    scales, lows = np.empty(len(blocks), np.float32), np.empty(len(blocks), np.float32)
    if not _encode_affine4(blocks, codes, scales, lows):
        return None
    n, k = weight.shape
    flat = codes.reshape(n, k)
    packed = flat[:, 0::2] | (flat[:, 1::2] << 4)  # (N, K/2): the even input low
    return Encoded(_lanes(packed), _lanes(scales.reshape(n, -1)), _lanes(lows.reshape(n, -1)))


def encode_scaled8(weight: np.ndarray) -> Encoded | None:
    """8-bit codes and per block (of 32 inputs, else of 16: :data:`SCALED_BLOCKS`) a float32 ``d`` with
    ``d * q == weight`` bitwise for every weight (d found from the block's largest magnitude and its
    code: :data:`SCALED_LARGEST_CODES`); None if some block has none."""
    for block in SCALED_BLOCKS:
        blocks = _blocks(weight, block)
        if blocks is None:
            return None
        codes = np.empty(blocks.shape, dtype=np.int8)
        scales = np.empty(len(blocks), np.float32)
        if _encode_scaled8(blocks, codes, scales, _SIGNED_LARGEST):
            n, k = weight.shape
            return Encoded(_lanes(codes.reshape(n, k)).view(np.uint8), _lanes(scales.reshape(n, -1)), None)
    return None


def encode_half(weight: np.ndarray) -> Encoded | None:
    """Every weight as a 16-bit code: its upper 16 bits where every weight's lower 16 are 0 (bfloat16
    values: the kernel shifts them back), else its float16 where every weight is one (the kernel
    converts it back); exact either way, and None where neither holds."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    weight = blocks.reshape(weight.shape)
    bits = weight.view(np.uint32)
    if not np.any(bits & np.uint32(0xFFFF)):
        return Encoded(_lanes((bits >> np.uint32(16)).astype(np.uint16)).view(np.uint8), None, None, "bf16")
    with np.errstate(over="ignore"):  # a weight beyond float16's range: inf, which then differs
        halves = weight.astype(np.float16)
    if not np.array_equal(halves.astype(np.float32).view(np.uint32), bits):
        return None
    return Encoded(_lanes(halves.view(np.uint16)).view(np.uint8), None, None, "f16")


def encode(weight: np.ndarray) -> Encoded | None:
    """The first encoding that holds ``weight`` exactly (fewest bytes first), or None. Each is tried on
    the first 16 rows before the whole matrix (most matrices fit none or the first)."""
    for encoding in (encode_affine4, encode_scaled8, encode_half):
        if encoding(weight[:LANES]) is not None:
            found = encoding(weight)
            if found is not None:
                return found
    return None


# ---- the kernel ------------------------------------------------------------------------------------------


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for): part of the built library's key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, text: str, out: Path, openmp: Path | None) -> None:
    """The C source ``text`` into the shared library ``out``; with ``openmp``, linked to that runtime file
    (torch's) so that its parallel loops run on torch's threads instead of a second pool."""
    with tempfile.TemporaryDirectory() as tmp:
        source, obj = Path(tmp) / SOURCE, Path(tmp) / "blocks.o"
        source.write_text(text, encoding="utf-8")
        flags = [*COMPILE_FLAGS, "-fopenmp"] if openmp is not None else COMPILE_FLAGS
        subprocess.run(
            [compiler, *flags, "-c", str(source), "-o", str(obj)],
            check=True,
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_suffix(f".tmp{os.getpid()}")  # linked beside it, then renamed: never half-written
        link = [compiler, "-shared", str(obj), "-o", str(staged)]
        if openmp is not None:
            link += [str(openmp), f"-Wl,-rpath,{openmp.parent}"]
        try:
            subprocess.run(link, check=True, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            staged.replace(out)
        finally:
            staged.unlink(missing_ok=True)  # a failed link leaves nothing behind


@functools.cache
def kernel(text: str | None = None) -> ctypes.CDLL | None:
    """The compiled ``blocks.c`` (or the C source ``text``: another version of it, for a benchmark), built
    once per machine (CPU flags, compiler, torch's OpenMP runtime) into ``$RESTSPEC_CACHE/kernels``; None
    (and a logged reason) where there is no C compiler or it fails: the block backend is then not
    offered."""
    from restspec.datastore.default import cache_dir
    from restspec.decode.threads import gnu_openmp_path

    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler (cc or $CC): the block-weight kernel is not built")
        return None
    if text is None:
        text = resources.files("restspec.decode").joinpath(SOURCE).read_text(encoding="utf-8")
    openmp = gnu_openmp_path()
    try:
        version = subprocess.run(
            [compiler, "--version"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("the C compiler %s does not run (%s): the block-weight kernel is not built", compiler, exc)
        return None
    key = "\n".join([text, version, _cpu_flags(), str(openmp), torch.__version__, *COMPILE_FLAGS])
    path = cache_dir() / "kernels" / f"blocks-{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
    try:
        if not path.is_file():
            _compile(compiler, text, path, openmp)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.info("building the block-weight kernel failed (%s): it is not used", detail)
        return None
    pointer, number = ctypes.c_void_p, ctypes.c_int
    shared = [pointer, number, number, pointer, pointer]  # x, rows, inputs, codes, scales
    lib.restspec_q4_linear.argtypes = [
        *shared,
        pointer,
        pointer,
        number,
        number,
    ]  # offsets, y, outputs, threads
    lib.restspec_q8_linear.argtypes = [*shared, number, pointer, number, number]  # block, y, outputs, threads
    lib.restspec_q4_linear.restype = lib.restspec_q8_linear.restype = ctypes.c_int  # -1: out of memory
    if hasattr(lib, "restspec_half_linear"):  # (a source of an earlier version may not have it)
        # x, rows, inputs, codes, bfloat16 (1) or float16 (0), y, outputs, threads
        lib.restspec_half_linear.argtypes = [*shared[:4], number, pointer, number, number]
        lib.restspec_half_linear.restype = ctypes.c_int
    if hasattr(lib, "restspec_decoder"):  # (a source of an earlier version may not have it)
        lib.restspec_decoder.argtypes = [
            pointer,
            pointer,
            number,
            pointer,
            pointer,
            number,
            pointer,
            pointer,
            number,
        ]
        lib.restspec_decoder.restype = None
        lib.restspec_decoder_floats.argtypes = [pointer, number, number, pointer, number]
        lib.restspec_decoder_floats.restype = ctypes.c_size_t
    return lib


class BlockGroup:
    """Linears that read the same input, encoded alike and joined along their outputs: one kernel call
    serves them all (their outputs side by side), as :class:`~restspec.decode.kernels.PackedGroup` does.

    Holds the modules' parameters (never writes them) and encodes them again when one changed in place;
    weights no longer on a grid are computed by ``F.linear`` from then on."""

    def __init__(self, modules: list[torch.nn.Linear], encoded: Encoded, lib: ctypes.CDLL) -> None:
        self.weights = [m.weight for m in modules]
        self.biases = [m.bias for m in modules]
        self.sizes = [m.out_features for m in modules]
        self.in_features = modules[0].in_features
        self.out_features = sum(self.sizes)
        self._lib = lib
        self._use(encoded)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self.weights, *self.biases) if t is not None)

    def _use(self, encoded: Encoded | None) -> None:
        self.encoded = encoded
        self.version = self._versions()
        self.bias = joined_bias(self.weights, self.biases)
        if encoded is not None:  # the kernel and the codes' addresses, looked up once rather than per call
            codes = encoded.codes.ctypes.data
            if encoded.scales is None:
                self._call = self._lib.restspec_half_linear
                self._args: tuple[int, ...] = (codes, int(encoded.half == "bf16"))
            elif encoded.offsets is not None:
                self._call = self._lib.restspec_q4_linear
                self._args = (codes, encoded.scales.ctypes.data, encoded.offsets.ctypes.data)
            else:
                self._call = self._lib.restspec_q8_linear
                self._args = (codes, encoded.scales.ctypes.data, encoded.block)

    def refresh(self) -> bool:
        """Encode the weights again if one changed in place since; whether they are (still) encoded."""
        if self._versions() != self.version:
            self._use(encode(torch.cat([w.detach() for w in self.weights]).numpy()))
        return self.encoded is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for input ``x`` (..., in), side by side: (..., sum of out_features)."""
        if not self.refresh():
            return torch.cat([F.linear(x, w, b) for w, b in zip(self.weights, self.biases, strict=True)], -1)
        rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        out = torch.empty((rows.shape[0], self.out_features), dtype=torch.float32)
        if rows.shape[0] and self._call(
            rows.data_ptr(),
            rows.shape[0],
            self.in_features,
            *self._args,
            out.data_ptr(),
            self.out_features,
            torch.get_num_threads(),
        ):
            raise MemoryError(f"no memory for the block kernel's work room ({rows.shape[0]} rows)")
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class BlockWeights(GroupIndex):
    """The block-encoded groups of one model's float32 CPU linears (those whose weights decode back
    exactly), built once; the model is only read. Build with :meth:`of`."""

    backend_name = "direct-blocks"

    def __init__(self, groups: list[BlockGroup], lib: ctypes.CDLL) -> None:
        super().__init__(groups)
        self.lib = lib

    def decoder(self, model: Any) -> BlockDecoder | None:
        """Every layer of ``model`` in one call where the decoder runs it (:meth:`BlockDecoder.of`) and
        the kernel has one."""
        return BlockDecoder.of(model, self, self.lib) if hasattr(self.lib, "restspec_decoder") else None

    @classmethod
    def of(cls, model: Any, lib: ctypes.CDLL | None = None) -> BlockWeights | None:
        """The encoded weights of ``model``'s float32 CPU ``nn.Linear`` layers, computed by ``lib``
        (default: :func:`kernel`); None where no linear's weights are block-encoded or the kernel cannot
        be built here."""
        encoded = {id(m): (m, encode(m.weight.detach().numpy())) for m in cpu_float32_linears(model)}
        found = [m for m, e in encoded.values() if e is not None]
        if not found:
            return None
        lib = lib or kernel()
        if lib is None:
            return None
        groups: list[BlockGroup] = []
        for members in shared_input_groups(model, found):
            parts = [encoded[id(m)][1] for m in members]
            joined = Encoded.join(parts) if len(members) > 1 else parts[0]  # type: ignore[arg-type]
            if joined is not None:
                groups.append(BlockGroup(members, joined, lib))
            else:
                groups += [BlockGroup([m], e, lib) for m, e in zip(members, parts, strict=True)]  # type: ignore[arg-type]
        return cls(groups, lib)


# ---- the decoder: every layer in one call -----------------------------------------------------------------


class _Linear(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("block", ctypes.c_int),
        ("inputs", ctypes.c_int),
        ("outputs", ctypes.c_int),
        ("offset", ctypes.c_int),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear * 3),
        ("o", _Linear),
        ("gate_up", _Linear * 2),
        ("down", _Linear),
        ("qkv_parts", ctypes.c_int),
        ("gate_up_parts", ctypes.c_int),
        ("in_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
        ("in_eps", ctypes.c_float),
        ("mlp_eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("q_heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("inter", ctypes.c_int),
        ("layer", ctypes.POINTER(_Layer)),
    ]


class _Segment(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_int),
        ("rows", ctypes.c_int),
        ("past", ctypes.c_int),
        ("causal", ctypes.c_int),
        ("mask", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("capacity", ctypes.c_void_p),
    ]


LAYER_PARTS = {
    "layer": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
    "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mlp": {"gate_proj", "up_proj", "down_proj", "act_fn"},
}
"""The submodules a decoder layer, its attention and its MLP may have for :class:`BlockDecoder` to run
it (anything else, e.g. Qwen3's q/k norms, is a part it does not know)."""
HEAD_DIM_MULTIPLE = 16
"""Head sizes the decoder's attention takes: multiples of the widest vector (16 floats)."""


class BlockDecoder:
    """Every decoder layer of a Llama-family model whose linears are all block-encoded, in one call of
    ``blocks.c``'s ``restspec_decoder`` (norms, rotary positions, attention, the gated MLP and the
    residuals in C around the block kernel): the per-operation cost of a layer-by-layer forward in
    torch, some 10-15 ms a forward of 30 layers on a small CPU, is gone.

    Build with :meth:`of`. Its arithmetic is float32 like the model's own, in another order: a row's
    attention reads only the keys it may see, in cache order, so a tree row computes bitwise what the
    same token decoded alone after compaction does, and a row never depends on the rows beside it."""

    def __init__(self, model: Any, groups: list[list[list[BlockGroup]]], lib: ctypes.CDLL) -> None:
        config, first = model.config, model.model.layers[0].self_attn
        self.layers = len(groups)
        self.q_heads = first.q_proj.out_features // first.head_dim
        self.kv_heads = first.k_proj.out_features // first.head_dim
        self.head_dim = first.head_dim
        self._slots = groups
        self.groups = [g for layer in groups for slot in layer for g in slot]
        self._lib = lib
        self._tensors = [t for g in self.groups for t in (*g.weights, *g.biases) if t is not None]
        self._norms = [
            (layer.input_layernorm, layer.post_attention_layernorm)
            for layer in model.model.layers[: self.layers]
        ]
        self._scaling = [float(layer.self_attn.scaling) for layer in model.model.layers[: self.layers]]
        self._model = _Model(
            self.layers,
            int(config.hidden_size),
            self.q_heads,
            self.kv_heads,
            self.head_dim,
            groups[0][3][0].in_features,
        )
        self._work = torch.empty(0, dtype=torch.float32)
        """The C side's buffers, kept between calls (grown as needed)."""
        self._lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        """The structures ``restspec_decoder`` reads, from the groups' current codes."""
        self._version = tuple(t._version for t in self._tensors)
        table = (_Layer * self.layers)()
        for index, (qkv, o, gate_up, down) in enumerate(self._slots):
            in_norm, mlp_norm = self._norms[index]
            table[index] = _Layer(
                (_Linear * 3)(*_linear_refs(qkv)),
                _linear_refs(o)[0],
                (_Linear * 2)(*_linear_refs(gate_up)),
                _linear_refs(down)[0],
                len(qkv),
                len(gate_up),
                in_norm.weight.data_ptr(),
                mlp_norm.weight.data_ptr(),
                norm_parts(in_norm)[1],
                norm_parts(mlp_norm)[1],
                self._scaling[index],
            )
        self._table = table
        self._model.layer = table

    @classmethod
    def of(cls, model: Any, weights: GroupIndex, lib: ctypes.CDLL) -> BlockDecoder | None:
        """The decoder of ``model`` (a Llama-family ``*ForCausalLM`` in float32) over its block-encoded
        ``weights``; None where a layer has parts it does not run (:data:`LAYER_PARTS`), norms other than
        RMS norms, an activation other than SiLU, or a linear that is not encoded."""
        try:
            layers = list(model.model.layers[: model.config.num_hidden_layers])
            found = [_layer_groups(layer, weights) for layer in layers]
        except AttributeError:
            return None
        if not layers or any(f is None for f in found):
            return None
        first = layers[0].self_attn
        if first.head_dim % HEAD_DIM_MULTIPLE or first.q_proj.out_features % first.k_proj.out_features:
            return None
        return cls(model, found, lib)  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list) -> bool:
        """``x`` (1, n, hidden) through every layer in place, rows ``spans`` (start, end, cache, mask,
        causal) each attending to its own cache; False (nothing done) where a cache is not of
        :func:`~restspec.decode.verify.new_cache`, a linear no longer decodes from codes or the rotary
        positions cover part of each head only."""
        from restspec.decode.verify import buffered_layers

        if cos.shape[-1] != self.head_dim:  # rotary positions on part of each head only
            return False
        if tuple(t._version for t in self._tensors) != self._version:  # weights changed in place
            if not all(g.refresh() for g in self.groups):
                return False
            self._build()
        caches = [buffered_layers(cache, self.layers) for _, _, cache, _, _ in spans]
        if any(c is None for c in caches):
            return False
        segments = (_Segment * len(spans))()
        keep: list[Any] = []  # what the pointers point into, alive until the call returns
        ends = []
        like = x.new_empty((1, self.kv_heads, 0, self.head_dim))
        for index, ((start, end, _, mask, causal), layers) in enumerate(zip(spans, caches, strict=True)):
            rows = end - start
            reserved = [layer.reserve(like, like, rows) for layer in layers]  # type: ignore[union-attr]
            keys = np.array([k.data_ptr() for k, _, _ in reserved], dtype=np.uintp)
            values = np.array([v.data_ptr() for _, v, _ in reserved], dtype=np.uintp)
            capacity = np.array([k.shape[-2] for k, _, _ in reserved], dtype=np.int64)
            past = reserved[0][2]
            mask = mask.contiguous()
            keep += [keys, values, capacity, mask]
            segments[index] = _Segment(
                start, rows, past, int(causal), mask.data_ptr(), keys.ctypes.data, values.ctypes.data,
                capacity.ctypes.data,
            )  # fmt: skip
            ends.append(past + rows)
        cos, sin = cos.contiguous(), sin.contiguous()
        n = x.shape[1]
        threads = torch.get_num_threads()
        with self._lock:  # one call at a time on the workspace
            floats = self._lib.restspec_decoder_floats(
                ctypes.byref(self._model), n, len(spans), segments, threads
            )
            if self._work.numel() < floats:
                self._work = torch.empty(floats, dtype=torch.float32)
            self._lib.restspec_decoder(
                ctypes.byref(self._model),
                x.data_ptr(),
                n,
                cos.data_ptr(),
                sin.data_ptr(),
                len(spans),
                segments,
                self._work.data_ptr(),
                threads,
            )
        for layers, end in zip(caches, ends, strict=True):
            for layer in layers:  # type: ignore[union-attr]
                layer.advance(end)
        return True


def _linear_refs(groups: list[BlockGroup]) -> list[_Linear]:
    """The C side's view of ``groups``, whose outputs lie side by side."""
    refs, offset = [], 0
    for group in groups:
        e = group.encoded
        block = 0 if e.half == "f16" else e.block  # type: ignore[union-attr]  # 0: f16 (d NULL and 32: bf16)
        refs.append(
            _Linear(
                e.codes.ctypes.data,  # type: ignore[union-attr]
                None if e.scales is None else e.scales.ctypes.data,  # type: ignore[union-attr]
                None if e.offsets is None else e.offsets.ctypes.data,  # type: ignore[union-attr]
                None if group.bias is None else group.bias.data_ptr(),
                block,
                group.in_features,
                group.out_features,
                offset,
            )
        )
        offset += group.out_features
    return refs


def _layer_groups(layer: Any, weights: GroupIndex) -> list[list[BlockGroup]] | None:
    """A layer's groups for q/k/v, o, gate/up and down (one joint group or one per linear), encoded, or
    None where the decoder does not run it."""
    attn, mlp = layer.self_attn, layer.mlp
    parts = [
        ({n for n, _ in layer.named_children()}, LAYER_PARTS["layer"]),
        ({n for n, _ in attn.named_children()}, LAYER_PARTS["attention"]),
        ({n for n, _ in mlp.named_children()}, LAYER_PARTS["mlp"]),
    ]
    if any(not names <= allowed for names, allowed in parts) or type(mlp.act_fn).__name__ not in (
        "SiLU",
        "SiLUActivation",
    ):
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(
        "RMSNorm" not in type(norm).__name__
        or getattr(norm, "bias", None) is not None
        or norm.weight.dtype != torch.float32
        or not norm.weight.is_contiguous()
        or norm.weight.device.type != "cpu"
        for norm in norms
    ):
        return None
    found = []
    for modules in (
        [attn.q_proj, attn.k_proj, attn.v_proj],
        [attn.o_proj],
        [mlp.gate_proj, mlp.up_proj],
        [mlp.down_proj],
    ):
        joint = weights.group_of(modules)
        slot = [joint] if joint is not None else [weights.group_of([m]) for m in modules]
        if any(g is None or not isinstance(g, BlockGroup) or g.encoded is None for g in slot):
            return None
        found.append(slot)
    return found  # type: ignore[return-value]
