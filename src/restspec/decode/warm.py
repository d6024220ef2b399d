"""Warm start: what the default drafter learns from the model's own conversations, learned once.

A fresh process drafts cold: the recycling table knows no token's likely successors, the drafter's
acceptance estimates (per-source rates and the map per depth) sit at their priors, and there are no
past outputs. Whatever a process serves first pays for that: in MT-Bench runs the first category
(writing) was the one where restspec did not lead SuffixDecoding (docs/benchmarks.md, MT-Bench).

:func:`learn_warm_start` makes the model write its own user questions (sampled from the chat
template's user turn, nobody's data) and answers them greedily with the default drafter and the
adaptive budget; :class:`WarmStart` keeps the conversations and the drafter's and the policy's
``state_dict`` after them. :meth:`WarmStart.apply` loads those states into a drafter and a policy of
the same shape; a drafter of another shape (another vocabulary, another method) gets the
conversations replayed as finished requests instead (the way past outputs reach its history, so a
method compared against restspec gets the same outputs). :func:`load_or_learn_warm_start` caches it
per model, dtype and tokenizer (about a minute on two cores, once).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from restspec.draft.base import Drafter, Learner, Step

if TYPE_CHECKING:
    from restspec.decode.generate import SpeculativeGenerator

WARM_START_VERSION = 5
"""Bump when what is learned or how changes, so cached warm starts are learned again (2: the
learners' state dicts; 3: the budget policy's state without the machine's step costs; 4: the weight
correction moved from the budget policy into the drafter; 5: token recycling keeps pair rows and
agreement rates)."""
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
    drafter_state: dict[str, Any]
    """The drafter's ``state_dict`` after the conversations."""
    policy_state: dict[str, Any] | None
    """The budget policy's ``state_dict`` after them (None: none was given)."""

    def summary(self) -> dict:
        """Size and version, for run records."""
        return {
            "version": WARM_START_VERSION,
            "conversations": len(self.outputs),
            "output_tokens": int(sum(len(o) for o in self.outputs)),
        }

    def apply(self, drafter: Drafter, policy: Learner | None = None) -> bool:
        """Load the learned states into ``drafter`` and ``policy``. A drafter the drafter state does
        not fit (another kind, another vocabulary) gets the conversations as finished requests
        instead; a policy the policy state does not fit stays as it is. Returns whether the drafter
        state was loaded."""
        loaded = _load(drafter, self.drafter_state)
        if not loaded:
            for prompt, output in zip(self.prompts, self.outputs, strict=True):
                drafter.start_request(prompt)
                drafter.observe(Step.finished(prompt, output))
                drafter.stop_request()
        if policy is not None and self.policy_state is not None:
            _load(policy, self.policy_state)
        return loaded

    @classmethod
    def capture(
        cls, prompts: list[np.ndarray], outputs: list[np.ndarray], drafter: Drafter, policy: Learner | None
    ) -> WarmStart:
        """The state of ``drafter`` and ``policy`` after they drafted these conversations."""
        return cls(prompts, outputs, drafter.state_dict(), None if policy is None else policy.state_dict())

    def save(self, path: Path) -> None:
        """Write to ``path`` (.npz), atomically."""
        arrays: dict[str, Any] = {
            "version": np.asarray(WARM_START_VERSION),
            "prompts": _join(self.prompts),
            "prompt_lengths": np.asarray([len(p) for p in self.prompts], np.int64),
            "outputs": _join(self.outputs),
            "output_lengths": np.asarray([len(o) for o in self.outputs], np.int64),
            **_flatten(self.drafter_state, "drafter/"),
        }
        if self.policy_state is not None:
            arrays |= _flatten(self.policy_state, "policy/")
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
            drafter = _unflatten(arrays, "drafter/")
            if drafter is None:
                raise KeyError("drafter/")
            return cls(
                prompts=_split(arrays["prompts"], arrays["prompt_lengths"]),
                outputs=_split(arrays["outputs"], arrays["output_lengths"]),
                drafter_state=drafter,
                policy_state=_unflatten(arrays, "policy/"),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path} is not a complete warm start file: {exc!r}") from exc


def _load(learner: Learner, state: dict[str, Any]) -> bool:
    """``learner.load_state_dict(state)``; False (learner unchanged) where the state does not fit."""
    try:
        learner.load_state_dict(state)
    except ValueError:
        return False
    return True


def _flatten(state: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """A nested state as flat arrays keyed ``prefix + "a/b/c"`` (``prefix`` ends in "/"; an empty dict
    is the key ``prefix + "a/"`` itself, so it comes back)."""
    if not state:
        return {prefix: np.zeros(0)}
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if "/" in key or not key:
            raise ValueError(f"state key {key!r} must be a non-empty name without '/'")
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}/")
        else:
            out[prefix + key] = np.asarray(value)
    return out


def _unflatten(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any] | None:
    """The nested state :func:`_flatten` wrote under ``prefix``, None if nothing was; numbers come back
    as 0-d arrays."""
    if not any(name.startswith(prefix) for name in arrays):
        return None
    state: dict[str, Any] = {}
    for name, value in arrays.items():
        if not name.startswith(prefix):
            continue
        *parents, leaf = name[len(prefix) :].split("/")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        if leaf:  # "" after a trailing "/": an empty dict
            node[leaf] = value
    return state


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
    asker: SpeculativeGenerator,
    answerer: SpeculativeGenerator,
    *,
    conversations: int = WARM_CONVERSATIONS,
    question_tokens: int = QUESTION_TOKENS,
    answer_tokens: int = ANSWER_TOKENS,
    seed: int = 0,
    on_conversation: Callable[[int], None] | None = None,
) -> WarmStart:
    """Have the model ask ``conversations`` questions through ``asker`` (sampled, seeds ``seed``,
    ``seed + 1``, ...) and answer each greedily through ``answerer`` (the same model, with the drafter
    and budget policy that learn); return what they learned. Greedy answers are the model's own, so
    nothing here depends on a data set. ``on_conversation(i)`` after each."""
    from restspec.decode.config import GenerationConfig, SamplingConfig

    tokenizer = answerer.tokenizer
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
    return WarmStart.capture(prompts, outputs, answerer.drafter, answerer.policy)


def warm_start_path(model_name: str, dtype: str, tokenizer: Any) -> Path:
    """``$RESTSPEC_CACHE/warm/<model>-<dtype>-<hash of tokenizer, version>.npz``."""
    from restspec.datastore.default import model_cache_file
    from restspec.datastore.fingerprint import tokenizer_fingerprint

    key = f"{tokenizer_fingerprint(tokenizer)}:{WARM_START_VERSION}"
    return model_cache_file("warm", model_name, dtype, key, ".npz")


def cached_warm_start(loaded: Any) -> WarmStart | None:
    """The warm start of ``loaded`` (a :class:`restspec.models.LoadedModel`) in the cache, else the one
    shipped with restspec for it, if either is there and readable."""
    from restspec.models import dtype_name

    return find_warm_start(str(loaded.name), dtype_name(loaded.model), loaded.tokenizer)


def find_warm_start(model_name: str, dtype: str, tokenizer: Any) -> WarmStart | None:
    """The warm start of this model, dtype and tokenizer in the cache, else the one shipped with
    restspec, if either is there and readable (:func:`cached_warm_start` without a loaded model)."""
    path = warm_start_path(model_name, dtype, tokenizer)
    for candidate in (path, shipped_warm_start(path.name)):
        if candidate is None or not candidate.is_file():
            continue
        try:
            return WarmStart.load(candidate)
        except ValueError:
            pass  # unreadable: look further, or learn again
    return None


def learn_and_cache_warm_start(
    loaded: Any,
    asker: SpeculativeGenerator,
    answerer: SpeculativeGenerator,
    *,
    on_conversation: Callable[[int], None] | None = None,
) -> WarmStart:
    """:func:`learn_warm_start` for ``loaded`` (a :class:`restspec.models.LoadedModel`) through
    ``asker`` and ``answerer`` (a fresh drafter and policy), saved where :func:`cached_warm_start`
    finds it."""
    from restspec.models import dtype_name

    warm = learn_warm_start(asker, answerer, on_conversation=on_conversation)
    warm.save(warm_start_path(str(loaded.name), dtype_name(loaded.model), loaded.tokenizer))
    return warm


def load_or_learn_warm_start(
    loaded: Any,
    make: Callable[[], tuple[SpeculativeGenerator, SpeculativeGenerator]],
    *,
    on_conversation: Callable[[int], None] | None = None,
) -> WarmStart:
    """:func:`cached_warm_start`, else :func:`learn_and_cache_warm_start` with the asker and the
    answerer that ``make()`` builds."""
    found = cached_warm_start(loaded)
    if found is not None:
        return found
    asker, answerer = make()
    return learn_and_cache_warm_start(loaded, asker, answerer, on_conversation=on_conversation)


def shipped_warm_start(name: str) -> Path | None:
    """The warm start restspec ships as package data under the cache file's ``name`` (same model, dtype,
    tokenizer and format version), if there is one: the embedded model's, so that a first run need
    not learn it."""
    from importlib.resources import files

    shipped = Path(str(files("restspec") / "data" / "warm" / name))
    return shipped if shipped.is_file() else None
