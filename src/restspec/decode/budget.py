"""How many draft nodes to verify in a step.

The generate loop asks the drafter for ``policy.max_budget`` nodes per request, then verifies the
first ``sizes[i]`` nodes of request i's tree, ``sizes = policy.choose_batch(trees, fixed_inputs)``
(any prefix of a tree's nodes is a valid tree), for every request of the step at once: they share one
forward, so the policy prices the nodes of all of them against that forward's cost. A policy is a
:class:`~restspec.draft.base.Learner`: after every step it observes each request's record (the
verified tree, the accepted path, what the step cost, how many requests shared it).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from restspec.draft.base import Learner, Step, check_state_keys
from restspec.draft.tree import DraftTree

if TYPE_CHECKING:
    from restspec.decode.backends import ForwardBackend


@runtime_checkable
class BudgetPolicy(Learner, Protocol):
    @property
    def max_budget(self) -> int:
        """The most nodes a step may verify; the drafter is asked for this many."""

    def choose(self, tree: DraftTree, past_len: int) -> int:
        """How many of ``tree``'s first nodes to verify on top of a cache of ``past_len`` tokens, for
        a request verified alone."""

    def choose_batch(
        self, trees: Sequence[DraftTree], fixed_inputs: int | None = None, room: int | None = None
    ) -> list[int]:
        """How many of each tree's first nodes to verify when all of them share one forward with
        ``fixed_inputs`` inputs that are verified anyway (every request's root and any prefill rows;
        default: one root per tree); ``room``: at most this many nodes in all (None: no bound)."""

    def step_room(self, fixed_inputs: int) -> int | None:
        """How many inputs (draft nodes, prompt rows) a step whose forward verifies ``fixed_inputs``
        anyway may add and stay within the step time the policy allows; None: no bound."""


@dataclass(frozen=True)
class FixedBudget:
    """Verify up to ``size`` nodes every step."""

    size: int
    """Most draft nodes per step (0 = plain decoding)."""

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size={self.size} must be >= 0")

    @property
    def max_budget(self) -> int:
        return self.size

    def choose(self, tree: DraftTree, past_len: int) -> int:
        return min(self.size, len(tree))

    def choose_batch(
        self, trees: Sequence[DraftTree], fixed_inputs: int | None = None, room: int | None = None
    ) -> list[int]:
        sizes = [min(self.size, len(tree)) for tree in trees]
        if room is None or sum(sizes) <= room:
            return sizes
        owner, _ = joint_order([np.ones(size) for size in sizes])  # round robin, in tree order
        return np.bincount(owner[: max(room, 0)], minlength=len(trees)).tolist()

    def step_room(self, fixed_inputs: int) -> int | None:
        return None

    def observe(self, step: Step) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state, set())


# ---------------------------------------------------------------------------------------------------
# Adaptive budget (bench stream): pick each step's tree size from a calibrated latency curve.

REFERENCE_LATENCY_S: tuple[tuple[int, float], ...] = (
    (1, 0.058),
    (8, 0.095),
    (16, 0.120),
    (32, 0.165),
    (64, 0.280),
)
"""(input tokens, seconds) of one forward on a ~300-token cache: SmolLM2-135M, float32, 2 CPU cores
(docs/DESIGN facts). Used by ``AdaptiveBudget()`` before a model has been calibrated; only the shape
matters for the choice (tokens per second is a ratio)."""

CALIBRATION_VERSION = 12
"""Bump when the measurement or the kernels change, so cached calibrations are redone (3: grouped
linears in restspec.decode.kernels; 4: the direct forward of restspec.decode.direct; 5: medians
instead of minima; 6: one calibration per forward backend and device; 7: the direct forward without
module calls; 8: the block kernel's wide tiles; 9: the block decoder, every layer in one C call; 10: the
block kernel scaling a block's sums instead of its weights; 11: its narrow tiles up to 12 rows; 12: three
rows in one-group tiles)."""
CALIBRATION_SIZES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 65)
"""Forward widths (root + tree nodes) measured by :func:`calibrate`; interpolated in between."""
CALIBRATION_PAST_LEN = 320
"""Cache length the calibration forwards run on (a typical prompt plus part of an answer)."""
CALIBRATION_ROUNDS = 7
"""Rounds over all sizes (interleaved, so machine noise hits all sizes alike); the median is kept."""
BUSY_OTHER_CORES = 0.25
"""A calibration during which other processes (and, on a virtual machine, the hypervisor's steal)
kept more than this many cores busy on average is used but not cached: forwards slowed by other
work would mis-shape the curve for every later run. Read from ``/proc/stat`` less this process's own
CPU time. The load average missed such a case: a test suite started next to a calibration on the
2-core machine cached a curve of 188 ms for one input (39 ms measured again on the quiet machine), because
the 1-minute average had not yet risen."""
BUSY_LOAD_PER_CORE = 1.5
"""Where there is no ``/proc/stat``: a calibration measured while the load average per core exceeds
this is used but not cached."""
CALIBRATION_SEED = 0
"""Seed of the random token ids the calibration forwards run on (latency does not depend on them)."""
DEFAULT_MAX_BUDGET = 12
"""Most draft nodes the adaptive policy verifies by default. A forward over 13 inputs already costs
about 1.5 plain steps on the 2-core reference machine (benchmarks/results/latency.md), and the policy's
acceptance estimates are least reliable on its widest trees: in replays of HumanEval and MT-Bench
(``python -m benchmarks.replay --latency``) on a flat calibration curve a cap of 12 beat 8, 16 and 32 by
1-2.5 %; on a steeper curve measured later, caps from 8 to 32 came within 1.5 % of each other
(the same replays). Drafting fewer nodes also costs less drafting time."""
WIDE_MAX_BUDGET = 64
"""Most draft nodes the adaptive policy verifies where width is nearly free (:func:`default_max_budget`):
on a GPU a forward over 65 inputs of a small model costs about what one input does. On MT-Bench the
default drafter's trees gained 2.36, 2.68, 3.04 and 3.41 tokens per step at 8, 16, 32 and 64 nodes
(the embedded model, benchmarks/results/mtbench-tree-widths-amd.md); the calibration curve covers
65 inputs (:data:`CALIBRATION_SIZES`)."""
FREE_WIDTH_COST = 1.25
"""A tree wider than :data:`DEFAULT_MAX_BUDGET` is verified only where its forward costs at most this
multiple of a plain step on the calibrated curve (CPUs measured: 13 inputs cost 1.3x one on an Intel
Xeon with AMX, 4.2x on an AMD EPYC with AVX2 with the block decoder, whose plain step is short; both
keep the default cap)."""
RATE_DECAY = 0.995
"""Per-step decay of the achieved tokens and seconds behind the long-run rate (about 200 steps)."""
STEP_PRIOR_WEIGHT = 8.0
"""Steps of the calibrated curve behind each width's latency until the loop's own steps outweigh it."""
STEP_OUTLIER = 2.0
"""An observed step counts as at most this multiple of its width's current estimate (one-time stalls,
such as compiling a kernel on the first call, must not set a width's cost for hundreds of steps)."""
STEP_REFIT_STEPS = 16
"""Rebuild the latency table from observed steps every this many steps."""
TABLE_WIDTH = 64
"""Widths the latency table covers at first; it grows (along the calibrated curve) as batches of
several requests verify wider forwards."""
MAX_TABLE_WIDTH = 4096
"""Widest forward the latency table extends to when it looks for :meth:`AdaptiveBudget.step_room`."""
STEP_LATENCY_FACTOR = 1.5
"""A step shared by several requests verifies drafts only up to this multiple of the longest step one
request takes alone (a root and :attr:`AdaptiveBudget.max_budget` nodes, at the latency the policy has
measured): drafts beyond it wait for later steps (the prompt chunks that batching without drafts
would run are never held back, see :class:`~restspec.decode.SpeculativeGenerator`). A request's
time between tokens under load then stays within twice what it sees alone, with room for the batch's
drafting and the machine's noise. A lower factor (``restspec serve --step-factor``) trades
throughput for latency: docs/serving-load.md."""


def check_step_factor(factor: float) -> None:
    """``ValueError`` unless ``factor`` (:data:`STEP_LATENCY_FACTOR`'s kind) is a number >= 1."""
    if not factor >= 1.0:  # also rejects NaN
        raise ValueError(
            f"step_factor={factor} must be >= 1 (a batch's step may take that multiple of a lone "
            f"request's longest step; default {STEP_LATENCY_FACTOR})"
        )


@dataclass(frozen=True)
class LatencyCurve:
    """Forward latency against the number of input tokens (root + tree nodes), piecewise linear.

    ``sizes``: strictly increasing widths, ``seconds``: the measured latency at each. Between points
    the curve is interpolated, past the last point extrapolated along the last segment; it is made
    non-decreasing on construction (a wider forward never costs less than a narrower one).
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        seconds = tuple(float(s) for s in self.seconds)
        if len(sizes) < 2 or len(sizes) != len(seconds):
            raise ValueError(
                f"sizes and seconds need one entry per point (>= 2), got {len(sizes)}/{len(seconds)}"
            )
        if sizes[0] != 1:
            raise ValueError(f"sizes must start at 1 (a plain step), got {sizes[0]}")
        if any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ValueError(f"sizes must increase strictly, got {sizes}")
        if any(not s > 0 for s in seconds):
            raise ValueError(f"seconds must be > 0, got {seconds}")
        monotone = tuple(float(x) for x in np.maximum.accumulate(np.asarray(seconds)))
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "seconds", monotone)

    def __call__(self, width: int | np.ndarray) -> np.ndarray:
        """Latency in seconds of forwards over ``width`` input tokens (scalar or array)."""
        x = np.asarray(width, dtype=np.float64)
        xs = np.asarray(self.sizes, dtype=np.float64)
        ys = np.asarray(self.seconds, dtype=np.float64)
        y = np.interp(x, xs, ys)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), y)

    def table(self, max_width: int) -> np.ndarray:
        """float64[max_width + 1]: latency for widths 0..max_width (index 0 unused, set to width 1's)."""
        widths = np.arange(max_width + 1)
        out = self(np.maximum(widths, 1))
        return np.asarray(out, dtype=np.float64)

    def to_json(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @classmethod
    def from_json(cls, data: dict) -> LatencyCurve:
        return cls(tuple(data["sizes"]), tuple(data["seconds"]))

    @classmethod
    def reference(cls) -> LatencyCurve:
        return cls(tuple(s for s, _ in REFERENCE_LATENCY_S), tuple(t for _, t in REFERENCE_LATENCY_S))


def joint_order(probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The nodes of several trees in the order a shared forward should take them: by falling
    probability, where a node's rank is the least probability on its tree's order up to it, so every
    tree's nodes keep their own order (each prefix taken is a valid tree). Returns (owner, prob):
    int64[N] tree index and float64[N] probability of each node in that order."""
    envelope = [np.minimum.accumulate(np.asarray(p, np.float64)) for p in probs]
    owner = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(probs)])
    index = np.concatenate([np.arange(len(p)) for p in probs])
    order = np.lexsort((owner, index, -np.concatenate(envelope)))
    values = np.concatenate([np.asarray(p, np.float64) for p in probs])
    return owner[order], values[order]


def default_max_budget(latency: LatencyCurve) -> int:
    """The adaptive policy's cap on ``latency``: :data:`DEFAULT_MAX_BUDGET` nodes, or more where width
    is nearly free: the widest tree of at most :data:`WIDE_MAX_BUDGET` nodes whose forward (root and
    nodes) costs at most :data:`FREE_WIDTH_COST` plain steps."""
    widths = np.arange(DEFAULT_MAX_BUDGET + 2, WIDE_MAX_BUDGET + 2)
    cheap = widths[latency(widths) <= FREE_WIDTH_COST * float(latency(1))]  # a prefix: the curve rises
    return int(cheap[-1]) - 1 if len(cheap) else DEFAULT_MAX_BUDGET


def best_budget(
    weights: np.ndarray, latency: np.ndarray, limit: int, scale: float = 1.0, rate: float | None = None
) -> int:
    """The c in 0..limit with the best expected return of verifying ``c`` nodes.

    ``weights``: float[n] node acceptance estimates ordered as the tree (any prefix is a valid tree);
    ``latency``: float[>= limit + 2], seconds of a forward over ``width`` inputs at index ``width``
    (root + c nodes = c + 1 inputs); ``scale`` multiplies the weights (capped at 1). With ``rate``
    (tokens per second the decoder achieves in the long run) c maximizes ``1 + sum(w[:c]) - rate *
    latency[c + 1]``: a node is verified when it adds more expected tokens than the time it costs would
    earn at that rate, which maximizes total tokens over total time (Dinkelbach). Without ``rate``, c
    maximizes this step's own ratio ``(1 + sum(w[:c])) / latency[c + 1]``. Ties go to the smaller tree.
    """
    c_max = min(limit, len(weights))
    if c_max <= 0:
        return 0
    w = np.minimum(np.asarray(weights[:c_max], dtype=np.float64) * scale, 1.0)
    expected = 1.0 + np.concatenate(([0.0], np.cumsum(w)))  # [c_max + 1]: tokens per step at c = 0..c_max
    seconds = latency[1 : c_max + 2]
    value = expected / seconds if rate is None else expected - rate * seconds
    return int(np.argmax(value))


def best_extra(weights: np.ndarray, latency: np.ndarray, fixed_inputs: int, rate: float) -> int:
    """The k maximizing ``sum(weights[:k]) - rate * latency[fixed_inputs + k]``: how many of the
    ranked nodes ``weights`` (:func:`joint_order`) a forward that verifies ``fixed_inputs`` inputs
    anyway should add (:func:`best_budget`'s rule for a forward shared by several requests)."""
    n = len(weights)
    gained = np.concatenate(([0.0], np.cumsum(np.minimum(np.asarray(weights, np.float64), 1.0))))
    seconds = latency[fixed_inputs : fixed_inputs + n + 1]
    return int(np.argmax(gained - rate * seconds))


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's machine type."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> dict:
    """What a latency calibration depends on besides the model: CPU, cores, threads, torch version."""
    import torch

    return {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _load_per_core() -> float:
    """1-minute load average per core (0 where the OS does not report it)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time counters at one moment, in seconds."""

    wall: float
    busy: float | None
    """CPU time every process has spent busy since boot (user, system, interrupts, and time the
    hypervisor stole), from ``/proc/stat``; None where the OS has none."""
    own: float
    """CPU time of this process (all its threads)."""


def cpu_snapshot() -> CpuSnapshot:
    times = os.times()
    try:
        with open("/proc/stat", encoding="ascii") as f:
            # cpu  user nice system idle iowait irq softirq steal ...
            fields = [int(x) for x in f.readline().split()[1:9]]
        busy: float | None = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = None
    return CpuSnapshot(time.monotonic(), busy, times.user + times.system)


def cores_busy_elsewhere(start: CpuSnapshot, end: CpuSnapshot) -> float | None:
    """Cores that other processes (and the hypervisor) kept busy on average between two snapshots;
    None where the OS does not tell."""
    wall = end.wall - start.wall
    if start.busy is None or end.busy is None or wall <= 0:
        return None
    return max((end.busy - start.busy) - (end.own - start.own), 0.0) / wall


def measured_while_busy(start: CpuSnapshot) -> bool:
    """Whether other work competed for the CPU since ``start`` (:data:`BUSY_OTHER_CORES`, else
    :data:`BUSY_LOAD_PER_CORE`)."""
    elsewhere = cores_busy_elsewhere(start, cpu_snapshot())
    if elsewhere is None:
        return _load_per_core() > BUSY_LOAD_PER_CORE
    return elsewhere > BUSY_OTHER_CORES


def device_key(device: object) -> dict:
    """What a forward's speed depends on besides the CPU: the device type, and an accelerator's name."""
    import torch

    device = torch.device(device)  # type: ignore[arg-type]
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type}


def calibration_path(
    model_name: str, dtype: str, key: dict | None = None, *, backend: str = "model", device: str = "cpu"
) -> Path:
    """``$RESTSPEC_CACHE/latency/<model>-<dtype>-<hash of machine key, backend, device>.json``."""
    from restspec.datastore.default import model_cache_file

    key = machine_key() if key is None else key
    blob = json.dumps(
        {"machine": key, "version": CALIBRATION_VERSION, "backend": backend, "device": device_key(device)},
        sort_keys=True,
    )
    return model_cache_file("latency", model_name, dtype, blob, ".json")


def calibrate(
    measure: Callable[[int], float],
    sizes: Sequence[int] = CALIBRATION_SIZES,
    rounds: int = CALIBRATION_ROUNDS,
) -> LatencyCurve:
    """Measure ``measure(width)`` (seconds of one forward over ``width`` new tokens) for every size,
    ``rounds`` times interleaved, and keep the median per size.

    Not the fastest: on the 2-core machine single forwards over 8-12 inputs now and then ran 15-20 %
    faster than their median, so a curve of minima was flat from 6 to 12 inputs (70 -> 72.5 ms) while
    the loop's own forwards over 10-13 inputs took 91 ms, and the policy verified such trees for 27 %
    of its MT-Bench steps (2026-11-29). The median is what a step can expect."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    sizes = sorted(set(int(s) for s in sizes))
    measure(sizes[-1])  # warm-up at the widest shape
    samples: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(rounds):
        for s in sizes:
            samples[s].append(float(measure(s)))
    return LatencyCurve(tuple(sizes), tuple(float(np.median(samples[s])) for s in sizes))


def read_calibration(path: Path) -> tuple[LatencyCurve, int]:
    """The curve of a calibration file written by :func:`load_or_calibrate`, and the widest forward it
    was measured for (0 if not recorded). ``ValueError`` if the file is not such a record."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LatencyCurve.from_json(data["curve"]), int(data.get("max_width", 0))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a latency calibration: {exc!r}") from exc


def load_or_calibrate(
    model_name: str,
    dtype: str,
    measure: Callable[[int], float],
    *,
    max_width: int,
    recalibrate: bool = False,
    backend: str = "model",
    device: str = "cpu",
) -> LatencyCurve:
    """The cached calibration for this machine + model + dtype + forward ``backend`` (its name) +
    ``device``, measuring (and caching) it if missing.

    A calibration taken while other work competed for the CPU (:data:`BUSY_OTHER_CORES`) is
    returned but not cached."""
    path = calibration_path(model_name, dtype, backend=backend, device=device)
    if not recalibrate and path.is_file():
        try:
            curve, measured_for = read_calibration(path)
            if curve.sizes[-1] >= max_width or measured_for >= max_width:
                return curve
        except ValueError:
            pass  # unreadable cache: measure again
    sizes = sorted({s for s in CALIBRATION_SIZES if s < max_width} | {1, max_width})
    start = cpu_snapshot()
    curve = calibrate(measure, sizes)
    if measured_while_busy(start):
        return curve  # measured on a busy machine: use it now, measure again next time
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": model_name,
        "dtype": dtype,
        "machine": machine_key(),
        "version": CALIBRATION_VERSION,
        "backend": backend,
        "device": device_key(device),
        "past_len": CALIBRATION_PAST_LEN,
        "max_width": max_width,
        "curve": curve.to_json(),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return curve


class AdaptiveBudget:
    """Choose each step's tree size to maximize tokens per second over the whole run.

    With node weights w (estimated acceptance probabilities, ordered so that any prefix is a tree) and
    forward latency L(width), verifying the first c nodes yields ``1 + sum(w[:c])`` tokens in expectation
    (the accepted drafts plus the model's own next token) for ``L(c + 1)`` seconds. The policy keeps
    the rate it achieves, r = tokens / seconds over recent steps (starting at plain decoding's
    1 / L(1)), and picks the c maximizing ``1 + sum(w[:c]) - r * L(c + 1)`` (:func:`best_budget`):
    a node is verified only if it is expected to add more tokens than its extra latency would earn at
    rate r. Maximizing each step's own ratio instead over-spends on weak trees (a step expected to
    gain 0.3 tokens happily adds nodes worth 0.05 each). Flat latency favours large trees, steep
    latency small ones.

    Measured costs: the calibrated curve is a prior. Every observed step reports its wall time by
    width (:attr:`Step.seconds`: drafting, forward and acceptance), and the table the choice uses
    becomes the observed mean per width, each width's curve value counting as
    :data:`STEP_PRIOR_WEIGHT` steps (scaled by the observed / calibrated ratio over all widths, so
    that widths not seen yet move with the rest). A calibration taken at a noisy moment (say, one node
    measured as free) is corrected by the run itself, on its real cache lengths and tree shapes.
    ``learn_costs=False`` plans with the calibrated curve alone.

    Node probabilities: the tree's weights, taken as they are. The drafter owns the estimate of how
    likely verification accepts each node and learns it from the steps (the default drafter's
    :class:`~restspec.draft.merge.MergedDrafter`: per-source rates, then a map per depth fitted to
    what was accepted); the policy only prices it. A drafter whose weights are not probabilities
    (say, raw counts) makes it verify too much or too little. The achieved rate is learned from the
    tokens each step added.

    ``AdaptiveBudget()`` uses :data:`REFERENCE_LATENCY_S`; ``AdaptiveBudget.for_model(loaded)``
    calibrates the real model once per machine and caches the curve.
    """

    def __init__(
        self,
        latency: LatencyCurve | None = None,
        max_budget: int | None = None,
        *,
        learn_costs: bool = True,
        step_factor: float = STEP_LATENCY_FACTOR,
    ):
        if max_budget is not None and max_budget < 0:
            raise ValueError(f"max_budget={max_budget} must be >= 0")
        check_step_factor(step_factor)
        self.latency = LatencyCurve.reference() if latency is None else latency
        self._max_budget = default_max_budget(self.latency) if max_budget is None else int(max_budget)
        self.learn_costs = learn_costs
        self.step_factor = float(step_factor)
        """A step shared by several requests verifies drafts only up to this multiple of a lone
        request's longest step (:meth:`step_room`)."""
        self._curve_table = self.latency.table(max(self._max_budget + 1, TABLE_WIDTH))
        self._table = self._curve_table.copy()  # the curve, then what steps measured
        self._step_s = np.zeros_like(self._table)  # decayed seconds and counts of steps by width
        self._step_n = np.zeros_like(self._table)
        self._since_refit = 0.0  # steps observed since the table was last rebuilt
        self._tokens = 1.0  # decayed sums behind the achieved rate; prior: one plain step
        self._seconds = float(self._table[1])

    @property
    def max_budget(self) -> int:
        return self._max_budget

    @property
    def rate(self) -> float:
        """Tokens per second achieved over recent steps (by the latency curve)."""
        return self._tokens / self._seconds

    def fresh(self) -> AdaptiveBudget:
        """A new policy on the same latency curve, with no history."""
        return AdaptiveBudget(
            self.latency, self._max_budget, learn_costs=self.learn_costs, step_factor=self.step_factor
        )

    def observe(self, step: Step) -> None:
        """Learn the achieved rate from the step's outcome, and its cost.

        A step that shared its forward with others (``step.batch_size`` requests) counts as that
        share of a forward: the rate becomes the batch's tokens per second, and the cost learned is
        the whole step's (the forward plus every request's drafting and acceptance, taken as this
        request's times the batch size)."""
        gained = len(step.accepted)
        share = 1.0 / max(step.batch_size, 1)
        width = step.forward_width
        self._grow(width)
        if 1 <= gained <= len(step.path) + 1:  # else no verified step
            decay = RATE_DECAY**share
            self._tokens = decay * self._tokens + gained
            self._seconds = decay * self._seconds + float(self._table[width]) * share
        seconds = step.forward_s + (step.draft_s + step.accept_s) / share
        self._learn_cost(width, seconds, share)

    def _grow(self, width: int) -> None:
        """Make the tables cover ``width`` inputs (new widths start from the calibrated curve)."""
        size = len(self._table)
        if width < size:
            return
        new = max(width + 1, 2 * size)
        curve = self.latency.table(new - 1)
        self._curve_table = curve
        self._table = np.maximum.accumulate(np.concatenate((self._table, curve[size:])))
        self._step_s = np.concatenate((self._step_s, np.zeros(new - size)))
        self._step_n = np.concatenate((self._step_n, np.zeros(new - size)))

    def _learn_cost(self, width: int, seconds: float, share: float = 1.0) -> None:
        """A step over ``width`` inputs (all requests' roots and nodes) took ``seconds`` of wall time;
        ``share``: the part of that step this observation stands for."""
        if not self.learn_costs or not 1 <= width < len(self._table) or not seconds > 0:
            return
        decay = RATE_DECAY**share
        self._step_s *= decay
        self._step_n *= decay
        self._step_s[width] += share * min(seconds, STEP_OUTLIER * self._table[width])  # a stall is no cost
        self._step_n[width] += share
        self._since_refit += share
        if self._since_refit >= STEP_REFIT_STEPS - 1e-9:
            self._since_refit = 0.0
            ratio = self._step_s.sum() / float(self._step_n @ self._curve_table)
            prior = STEP_PRIOR_WEIGHT * ratio * self._curve_table
            table = (self._step_s + prior) / (self._step_n + STEP_PRIOR_WEIGHT)
            table[0] = table[1]
            self._table = np.maximum.accumulate(table)

    def choose(self, tree: DraftTree, past_len: int) -> int:
        limit = min(self._max_budget, len(tree))
        if limit <= 0:
            return 0
        return best_budget(tree.weights[:limit], self._table, limit, rate=self.rate)

    def choose_batch(
        self, trees: Sequence[DraftTree], fixed_inputs: int | None = None, room: int | None = None
    ) -> list[int]:
        """Every request's tree size at once: the nodes of all trees ranked by probability
        (:func:`joint_order`), as many taken (at most ``room``) as pay for their share of the forward
        at the achieved rate (:func:`best_extra`). The more requests share the step, the higher that
        rate and the fewer nodes pay: speculation shrinks as the batch grows, down to none."""
        fixed = len(trees) if fixed_inputs is None else int(fixed_inputs)
        limits = [min(self._max_budget, len(tree)) for tree in trees]
        if sum(limits) == 0 or (room is not None and room <= 0):
            return [0] * len(trees)
        owner, probs = joint_order([t.weights[:c] for t, c in zip(trees, limits, strict=True)])
        if room is not None:
            owner, probs = owner[:room], probs[:room]
        self._grow(fixed + len(probs))
        k = best_extra(probs, self._table, fixed, self.rate)
        return np.bincount(owner[:k], minlength=len(trees)).tolist()

    def step_room(self, fixed_inputs: int) -> int:
        """Inputs a step over ``fixed_inputs`` may add and take at most :attr:`step_factor` times the
        longest step of a lone request (by the latency table, which follows what steps measured)."""
        lone = float(self._table[min(self._max_budget + 1, len(self._table) - 1)])
        limit = self.step_factor * lone
        while self._table[-1] <= limit and len(self._table) < MAX_TABLE_WIDTH:
            self._grow(len(self._table))
        widest = int(np.searchsorted(self._table, limit, side="right")) - 1  # table is non-decreasing
        return max(widest - int(fixed_inputs), 0)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: what the policy learns is what this machine's steps cost and the rate they
        achieve, which belong to the machine and the process; every policy measures them afresh from
        its latency curve, so a state learned elsewhere (a shipped warm start) misleads no cost. What
        is learned about the drafts belongs to the drafter."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the :meth:`state_dict` of an adaptive policy (empty)."""
        check_state_keys(self, state, set())

    @classmethod
    def for_model(
        cls,
        loaded: object,
        max_budget: int | None = None,
        *,
        recalibrate: bool = False,
        backend: ForwardBackend | None = None,
        max_batch: int = 1,
        **kwargs: object,
    ) -> AdaptiveBudget:
        """Calibrated on ``loaded`` (a :class:`restspec.models.LoadedModel`) through ``backend`` (default:
        the model's own forward), as the generator will run; the latency curve is cached per machine +
        model + dtype + backend + device. It is measured up to the widest forward one request verifies,
        or with ``max_batch`` requests per forward up to what they verify together (at most the widest
        of :data:`CALIBRATION_SIZES`; wider forwards follow its last segment): past a dozen inputs a
        CPU forward turns from bound by reading the weights to bound by arithmetic, and a curve that
        stopped before the turn would price a batch's wide forwards too low. ``max_budget`` None: the
        curve's :func:`default_max_budget`, measured up to :data:`WIDE_MAX_BUDGET` nodes to tell."""
        from restspec.decode.backends import ModelForward
        from restspec.models import dtype_name

        model = loaded.model  # type: ignore[attr-defined]
        backend = backend or ModelForward(model)
        dtype = dtype_name(model)
        name = str(getattr(loaded, "name", type(model).__name__))
        widest = WIDE_MAX_BUDGET if max_budget is None else max_budget
        # built (its prefill run) only if the curve is measured, not when it is read from the cache
        probe = functools.cache(lambda: ForwardLatencyProbe(backend, past_len=CALIBRATION_PAST_LEN))
        curve = load_or_calibrate(
            name,
            dtype,
            lambda width: probe()(width),
            max_width=min(max_batch * (widest + 1), max(widest + 1, CALIBRATION_SIZES[-1])),
            recalibrate=recalibrate,
            backend=backend.key,
            device=str(backend.device),
        )
        return cls(curve, max_budget, **kwargs)  # type: ignore[arg-type]


class ForwardLatencyProbe:
    """``probe(width)``: seconds of one :func:`~restspec.decode.verify.forward_tree` of ``backend`` over
    ``width`` inputs (root + width - 1 chained nodes) on a cache of ``past_len`` tokens; the cache is
    restored to ``past_len`` tokens after every call, so all widths are measured on the same cache
    length. On an accelerator each call waits for the device to finish."""

    def __init__(self, backend: ForwardBackend, past_len: int = CALIBRATION_PAST_LEN) -> None:
        import torch

        from restspec.decode.verify import new_cache, prefill

        if past_len < 1:
            raise ValueError(f"past_len={past_len} must be >= 1")
        self.backend = backend
        self.past_len = past_len
        vocab = int(backend.model.get_input_embeddings().num_embeddings)
        rng = np.random.default_rng(CALIBRATION_SEED)
        self._prompt = rng.integers(0, vocab, size=past_len + 1).astype(np.int32)
        self._nodes = rng.integers(0, vocab, size=1024).astype(np.int32)
        self.cache = new_cache()
        with torch.inference_mode():
            prefill(backend, self.cache, self._prompt[:-1])

    def __call__(self, width: int) -> float:
        from restspec.decode.verify import compact_cache, forward_tree

        if not 1 <= width <= len(self._nodes) + 1:
            raise ValueError(f"width={width} must lie in [1, {len(self._nodes) + 1}]")
        tree = DraftTree.chain(self._nodes[: width - 1])
        t0 = time.perf_counter()
        logits = forward_tree(self.backend, self.cache, int(self._prompt[-1]), tree, self.past_len)
        logits[-1, :1].cpu()  # waits for an accelerator; nothing to wait for on the CPU
        seconds = time.perf_counter() - t0
        # the cache holds past_len + width rows: keep the first past_len (compaction keeps "root" row
        # past_len - 1 and an empty path)
        compact_cache(self.cache, self.past_len - 1, [], width)
        return seconds
