"""Configuration of one generation request."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from restspec.errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. The warps match ``transformers``' sampling: temperature, then
    top-k, then top-p."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides the logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most probable tokens (0 = off)."""
    seed: int | None = None
    """Seed of the request's random generator; the same seed gives the same output."""

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise GenerationError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise GenerationError(f"seed={self.seed!r} must be an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationConfig:
    """Limits and stopping rules of one request."""

    max_new_tokens: int = 256
    """Most tokens to generate (the end-of-sequence token counts)."""
    sampling: SamplingConfig = SamplingConfig()
    """Greedy or sampling, see :class:`SamplingConfig`."""
    stop_strings: tuple[str, ...] = ()
    """Generation stops when the text contains one of these; the text is cut before it."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not isinstance(self.sampling, SamplingConfig):
            raise GenerationError(f"sampling={self.sampling!r} must be a SamplingConfig")
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise GenerationError(
                    f"stop_strings contains {stop!r}; each stop string must be non-empty text"
                )
        object.__setattr__(self, "stop_strings", stops)


def generation_config(config: GenerationConfig | None, settings: dict[str, Any]) -> GenerationConfig:
    """``config``, or one built from keyword ``settings`` (not both): max_new_tokens, temperature,
    top_p, top_k, seed, stop (a string or several)."""
    if not settings:
        return config or GenerationConfig()
    if config is not None:
        raise GenerationError(
            f"pass either a GenerationConfig or keyword settings, not both (got {sorted(settings)})"
        )
    sampling_keys = {"temperature", "top_p", "top_k", "seed"}
    known = sampling_keys | {"max_new_tokens", "stop"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise GenerationError(f"unknown generation settings {unknown}; use {sorted(known)}")
    stop = settings.get("stop", ())
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    sampling = SamplingConfig(**{k: v for k, v in settings.items() if k in sampling_keys})
    defaults = GenerationConfig()
    return GenerationConfig(
        max_new_tokens=settings.get("max_new_tokens", defaults.max_new_tokens),
        sampling=sampling,
        stop_strings=stops,
    )
