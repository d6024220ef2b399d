"""Warm start: what the default drafter learns from the model's own conversations, learned once.

A fresh process drafts cold: the recycling table knows no token's likely successors, the per-source
acceptance rates and the budget's weight calibration sit at their priors, and there are no past
outputs. Whatever a process serves first pays for that: in MT-Bench runs the first category
(writing) was the one where restspec did not lead SuffixDecoding (docs/benchmarks.md, MT-Bench).

:func:`learn_warm_start` makes the model write its own user questions (sampled from the chat
template's user turn, nobody's data) and answers them greedily with the default drafter and the
adaptive budget; :class:`WarmStart` keeps the conversations and what the drafter and the policy
learned. :meth:`WarmStart.apply` replays the conversations into any drafter as finished requests
(the way past outputs reach its history, so a method compared against restspec gets the same
outputs), then hands a :class:`~restspec.draft.merge.MergedDrafter` the learned recycling table and
per-source rates and an :class:`~restspec.decode.budget.AdaptiveBudget` its weight calibration.
:func:`load_or_learn_warm_start` caches it per model, dtype and tokenizer (about a minute on two
cores, once).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from restspec.draft.base import Drafter
from restspec.draft.merge import MergedDrafter
from restspec.draft.recycle import RecycleDrafter

WARM_START_VERSION = 1
"""Bump when what is learned or how changes, so cached warm starts are learned again."""
WARM_CONVERSATIONS = 32
"""Conversations the model writes for a warm start."""
QUESTION_TOKENS = 48
"""Most tokens of a sampled user question."""
ANSWER_TOKENS = 128
"""Most tokens of a greedy answer."""
QUESTION_TEMPERATURE = 1.0
"""Questions are sampled at the model's own distribution, one seed per conversation."""


@dataclass(frozen=True, eq=False)
class WarmStart:
    """Conversations the model had with itself and what drafting them taught."""

    prompts: list[np.ndarray]
    """int32[L] per conversation: the chat-templated question."""
    outputs: list[np.ndarray]
    """int32[T] per conversation: the model's greedy answer."""
    recycle_table: np.ndarray
    """int32[V, k]: the :class:`RecycleDrafter` table after the conversations (empty: none)."""
    recycle_hits: np.ndarray
    """float64[k]: its rank hits."""
    recycle_trials: float
    """Rows it scored."""
    calibration: dict[str, tuple[np.ndarray, np.ndarray]]
    """Per source class name: the merge calibration's (hits, trials) tables."""
    weight_calibration: tuple[np.ndarray, np.ndarray, int] | None
    """The adaptive budget's weight calibration: (x'x, x'y, steps), or None."""

    def summary(self) -> dict:
        """Size and version, for run records."""
        return {
            "version": WARM_START_VERSION,
            "conversations": len(self.outputs),
            "output_tokens": int(sum(len(o) for o in self.outputs)),
        }

    def apply(self, drafter: Drafter, policy: Any = None) -> None:
        """Feed the conversations to ``drafter`` as finished requests, then give a
        :class:`MergedDrafter` and an adaptive ``policy`` what was learned (where shapes agree)."""
        for prompt, output in zip(self.prompts, self.outputs, strict=True):
            drafter.start_request(prompt)
            drafter.observe(prompt, output, None)
            drafter.stop_request()
        if isinstance(drafter, MergedDrafter):
            for s, source in enumerate(drafter.drafters):
                if isinstance(source, RecycleDrafter) and source.table.shape == self.recycle_table.shape:
                    source.table[:] = self.recycle_table
                    source.hits[:] = self.recycle_hits
                    source.trials = self.recycle_trials
                    source.reset_template()
                tables = self.calibration.get(type(source).__name__)
                if tables is not None and tables[0].shape == drafter.calibration.hits[s].shape:
                    drafter.calibration.hits[s] = tables[0]
                    drafter.calibration.trials[s] = tables[1]
        calibration = getattr(policy, "calibration", None)
        if self.weight_calibration is not None and calibration is not None:
            calibration.load_state(*self.weight_calibration)

    @classmethod
    def capture(
        cls, prompts: list[np.ndarray], outputs: list[np.ndarray], drafter: MergedDrafter, policy: Any
    ) -> WarmStart:
        """The state of ``drafter`` and ``policy`` after they drafted these conversations."""
        recyclers = [d for d in drafter.drafters if isinstance(d, RecycleDrafter)]
        calibration = {
            type(source).__name__: (drafter.calibration.hits[s].copy(), drafter.calibration.trials[s].copy())
            for s, source in enumerate(drafter.drafters)
        }
        weights = getattr(policy, "calibration", None)
        return cls(
            prompts=prompts,
            outputs=outputs,
            recycle_table=recyclers[0].table.copy() if recyclers else np.zeros((0, 0), np.int32),
            recycle_hits=recyclers[0].hits.copy() if recyclers else np.zeros(0),
            recycle_trials=float(recyclers[0].trials) if recyclers else 0.0,
            calibration=calibration,
            weight_calibration=None if weights is None else weights.state(),
        )

    def save(self, path: Path) -> None:
        """Write to ``path`` (.npz), atomically."""
        names = sorted(self.calibration)
        arrays: dict[str, Any] = {
            "version": np.asarray(WARM_START_VERSION),
            "prompts": _join(self.prompts),
            "prompt_lengths": np.asarray([len(p) for p in self.prompts], np.int64),
            "outputs": _join(self.outputs),
            "output_lengths": np.asarray([len(o) for o in self.outputs], np.int64),
            "recycle_table": self.recycle_table,
            "recycle_hits": self.recycle_hits,
            "recycle_trials": np.asarray(self.recycle_trials),
            "calibration_sources": np.asarray(names),
            "calibration_hits": np.stack([self.calibration[n][0] for n in names]),
            "calibration_trials": np.stack([self.calibration[n][1] for n in names]),
        }
        if self.weight_calibration is not None:
            xtx, xty, steps = self.weight_calibration
            arrays |= {"weight_xtx": xtx, "weight_xty": xty, "weight_steps": np.asarray(steps)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> WarmStart:
        """Read a file :meth:`save` wrote; ``ValueError`` if it is not one (or of another version)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            version = int(arrays["version"])
        except (OSError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise ValueError(f"{path} is not a warm start file: {exc}") from exc
        if version != WARM_START_VERSION:
            raise ValueError(f"{path} is warm start version {version}, not {WARM_START_VERSION}")
        try:
            weights = None
            if "weight_xtx" in arrays:
                weights = (arrays["weight_xtx"], arrays["weight_xty"], int(arrays["weight_steps"]))
            return cls(
                prompts=_split(arrays["prompts"], arrays["prompt_lengths"]),
                outputs=_split(arrays["outputs"], arrays["output_lengths"]),
                recycle_table=arrays["recycle_table"].astype(np.int32),
                recycle_hits=arrays["recycle_hits"].astype(np.float64),
                recycle_trials=float(arrays["recycle_trials"]),
                calibration={
                    str(name): (arrays["calibration_hits"][i], arrays["calibration_trials"][i])
                    for i, name in enumerate(arrays["calibration_sources"])
                },
                weight_calibration=weights,
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path} is not a complete warm start file: {exc!r}") from exc


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)


def _split(joined: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    if int(lengths.sum()) != len(joined):
        raise ValueError(f"lengths add up to {int(lengths.sum())} tokens, the file holds {len(joined)}")
    if len(lengths) == 0:
        return []
    return [part.astype(np.int32) for part in np.split(joined, np.cumsum(lengths)[:-1])]


def question_prefix(tokenizer: Any) -> np.ndarray:
    """int32[L]: where a user's message begins: the chat template up to it (system prompt included),
    or the tokenizer's first special token for a model without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00"
        messages = [{"role": "user", "content": marker}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        head = text[: text.index(marker)]
        return np.asarray(tokenizer(head, add_special_tokens=False)["input_ids"], np.int32)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return np.asarray([start if start is not None else 0], np.int32)


def learn_warm_start(
    model: Any,
    tokenizer: Any,
    drafter: MergedDrafter,
    policy: Any,
    *,
    conversations: int = WARM_CONVERSATIONS,
    question_tokens: int = QUESTION_TOKENS,
    answer_tokens: int = ANSWER_TOKENS,
    seed: int = 0,
    on_conversation: Callable[[int], None] | None = None,
) -> WarmStart:
    """Have the model ask ``conversations`` questions (sampled, seeds ``seed``, ``seed + 1``, ...) and
    answer each greedily with ``drafter`` and ``policy``; return what they learned. Greedy answers are
    the model's own, so nothing here depends on a data set. ``on_conversation(i)`` after each."""
    from restspec.decode.config import GenerationConfig, SamplingConfig
    from restspec.decode.generate import SpeculativeGenerator

    asker = SpeculativeGenerator(model, tokenizer, budget=0)
    answerer = SpeculativeGenerator(model, tokenizer, drafter=drafter, budget=policy)
    prefix = question_prefix(tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None))
    limit = answerer.layout.max_positions
    prompts, outputs = [], []
    for i in range(conversations):
        sampling = SamplingConfig(temperature=QUESTION_TEMPERATURE, seed=seed + i)
        asked = asker.generate(prefix, GenerationConfig(max_new_tokens=question_tokens, sampling=sampling))
        question = asked.text.strip()
        prompt = answerer.encode(question, chat) if question else None
        if prompt is not None and (limit is None or len(prompt) < limit):  # a tiny context may not fit it
            answer = answerer.generate(prompt, GenerationConfig(max_new_tokens=answer_tokens))
            prompts.append(prompt)
            outputs.append(answer.output_ids.astype(np.int32))
        if on_conversation is not None:
            on_conversation(i)
    return WarmStart.capture(prompts, outputs, drafter, policy)


def warm_start_path(model_name: str, dtype: str, tokenizer: Any) -> Path:
    """``$RESTSPEC_CACHE/warm/<model>-<dtype>-<hash of tokenizer, version>.npz``."""
    from restspec.datastore.default import model_cache_file
    from restspec.datastore.fingerprint import tokenizer_fingerprint

    key = f"{tokenizer_fingerprint(tokenizer)}:{WARM_START_VERSION}"
    return model_cache_file("warm", model_name, dtype, key, ".npz")


def load_or_learn_warm_start(
    loaded: Any,
    make: Callable[[], tuple[MergedDrafter, Any]],
    *,
    relearn: bool = False,
    on_conversation: Callable[[int], None] | None = None,
) -> WarmStart:
    """The cached warm start of ``loaded`` (a :class:`restspec.models.LoadedModel`), learned first
    (with a fresh drafter and policy from ``make()``) when missing or unreadable."""
    from restspec.models import dtype_name

    path = warm_start_path(str(loaded.name), dtype_name(loaded.model), loaded.tokenizer)
    if not relearn and path.is_file():
        try:
            return WarmStart.load(path)
        except ValueError:
            pass  # unreadable cache: learn again
    drafter, policy = make()
    warm = learn_warm_start(loaded.model, loaded.tokenizer, drafter, policy, on_conversation=on_conversation)
    warm.save(path)
    return warm
