"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic.

Types are strict (``"0.7"`` is not a temperature, ``1`` is not ``true``), and fields restspec cannot
honour are accepted only at their neutral value: ``best_of=2``, ``logprobs=true`` or ``min_p=0.1`` is a 400
that says so rather than a silently different answer. Fields other servers take that would change the
answer (:data:`ANSWER_CHANGING`) are known by name; any other unknown field is ignored (clients send
bookkeeping fields such as ``metadata`` or ``store``). Every failure here becomes a 400 in OpenAI's
error shape (see :mod:`restspec.serve.errors`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on ``stop`` sequences per request."""

_MAX_SHOWN = 80
"""Characters of a rejected value quoted in an error message."""

MAX_TEMPERATURE = 2.0
"""OpenAI's upper bound for ``temperature``."""

MAX_SEED = 2**64 - 1
"""The largest seed torch's random generator takes."""
MAX_CHOICES = 16
"""Most completions (``n``) one request may ask for."""


ANSWER_CHANGING: dict[str, tuple[Any, ...]] = {
    # sampling and penalties (vLLM, TGI, llama.cpp, OpenRouter)
    "min_p": (0, 0.0),
    "typical_p": (1, 1.0),
    "top_a": (0, 0.0),
    "tfs_z": (1, 1.0),
    "repetition_penalty": (1, 1.0),
    "repeat_penalty": (1, 1.0),
    "length_penalty": (1, 1.0),
    "mirostat": (0,),
    "dry_multiplier": (0, 0.0),
    "xtc_probability": (0, 0.0),
    # stopping and length
    "stop_token_ids": (None, []),
    "ignore_eos": (False,),
    "min_tokens": (0,),
    "n_predict": (),
    "include_stop_str_in_output": (False,),
    # search
    "use_beam_search": (False,),
    # the prompt
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "truncate_prompt_tokens": (None,),
    "reasoning_effort": (None,),
    # the text returned
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "prompt_logprobs": (None, 0),
    # structured output and function calling
    "functions": (None, []),
    "function_call": (None, "none"),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "grammar": (None,),
    "json_schema": (None,),
    # other modalities
    "modalities": (None, ["text"]),
    "audio": (None,),
}
"""Fields restspec does not implement that would change the answer, with the values that change
nothing (accepted): any other value is a 400 naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """One part of a message's content given as a list; only text parts exist for a text model."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    """Required, as OpenAI requires it of every message without tool calls (restspec takes none)."""
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_template_message(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict a chat template expects (``developer`` is OpenAI's new
        name for ``system``, which is what chat templates know)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]`` with ``usage`` and no choices (OpenAI's behaviour)."""


class SamplingRequest(_Strict):
    """Fields shared by ``/v1/chat/completions`` and ``/v1/completions``."""

    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields are checked, see ANSWER_CHANGING

    model: str | None = None
    """The served model's id (see ``GET /v1/models``); omitted = the one model this server has."""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    """restspec extension: keep only the k most likely tokens when sampling (0 = all)."""
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    """Completions of the same prompt (each its own request in the batch; with ``seed``, choice i is
    sampled with ``seed + i``)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Who the request is for: with the API key, the tenant whose past outputs draft for it."""
    restspec_stats: bool = False
    """restspec extension: add the ``restspec`` field (speculation figures) to the response."""

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else (stop or [])
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(sequences)}")
        if any(s == "" for s in sequences):
            raise ValueError("stop sequences must not be empty strings")
        return stop

    @model_validator(mode="after")
    def _check_unsupported(self) -> SamplingRequest:
        for name, value in (self.model_extra or {}).items():
            neutral = ANSWER_CHANGING.get(name)
            if neutral is not None and not any(_same(value, n) for n in neutral):
                raise UnsupportedValue(
                    name,
                    value,
                    f"{name} is not supported and would change the answer; leave it out",
                )
        if self.stream and self.choices() > 1:
            raise UnsupportedValue(
                "n", self.n, "restspec streams one completion per request; send n=1 or stream=false"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise UnsupportedValue(name, value, "penalties are not supported; send 0 or leave it out")
        if self.logit_bias:
            raise UnsupportedValue("logit_bias", self.logit_bias, "logit_bias is not supported; leave it out")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedValue(
                "stream_options", self.stream_options.model_dump(), "stream_options needs stream=true"
            )
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        """The field :meth:`requested_max_tokens` came from."""
        return "max_tokens"

    def choices(self) -> int:
        """How many completions to return (``n``, 1 when left out)."""
        return 1 if self.n is None else self.n

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat_unsupported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise UnsupportedValue("logprobs", self.logprobs, "logprobs are not supported; leave it out")
        if self.top_logprobs:
            raise UnsupportedValue(
                "top_logprobs", self.top_logprobs, "logprobs are not supported; leave it out"
            )
        if self.tools:
            raise UnsupportedValue("tools", self.tools, "tool calling is not supported; leave out tools")
        if self.tool_choice not in (None, "none"):
            raise UnsupportedValue(
                "tool_choice", self.tool_choice, "tool calling is not supported; leave it out"
            )
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise UnsupportedValue(
                "response_format", self.response_format, 'only {"type": "text"} is supported; leave it out'
            )
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    """A string, a list of one string, or a list of token ids."""
    echo: bool = False
    """Return the prompt's text in front of the completion."""
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be an empty list")
            if isinstance(prompt[0], str) and len(prompt) != 1:
                raise ValueError(
                    f"got {len(prompt)} prompts: restspec serves one prompt per request, send them one by one"
                )
            if isinstance(prompt[0], int) and min(prompt) < 0:
                raise ValueError(f"token ids must be >= 0, got {min(prompt)}")
        return prompt

    @model_validator(mode="after")
    def _check_completion_unsupported(self) -> CompletionRequest:
        if self.logprobs is not None:  # 0 too: OpenAI then returns the chosen tokens' logprobs
            raise UnsupportedValue("logprobs", self.logprobs, "logprobs are not supported; leave it out")
        if self.best_of is not None and self.best_of != 1:
            raise UnsupportedValue(
                "best_of", self.best_of, "restspec returns one completion; send 1 or leave it out"
            )
        if self.suffix:
            raise UnsupportedValue("suffix", self.suffix, "insertion (suffix) is not supported; leave it out")
        return self

    def prompt_input(self) -> str | list[int]:
        """What the generator takes: a string, or token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        if isinstance(self.prompt[0], str):
            return self.prompt[0]
        return list(self.prompt)


def _same(value: Any, neutral: Any) -> bool:
    """``value == neutral`` with the types (``1`` is not ``True``)."""
    return (type(value) is type(neutral) and value == neutral) or (
        isinstance(value, float) and type(neutral) is int and value == neutral
    )


class UnsupportedValue(ValueError):
    """A field restspec accepts only at its neutral value; pydantic reports it as a 400 naming the field."""

    def __init__(self, param: str, value: object, advice: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= _MAX_SHOWN else shown[: _MAX_SHOWN - 3] + "..."
        super().__init__(f"{param}={shown}: {advice}")
        self.param = param
