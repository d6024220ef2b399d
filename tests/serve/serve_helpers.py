"""Helpers of the server tests: a tiny random Llama with a byte-level BPE tokenizer and a ChatML chat
template saved as a Hugging Face folder, test drafters, a real uvicorn server in a thread, an SSE reader.
(A module of its own, not conftest, so that its name cannot clash with other test folders' conftest.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tiny_models import tiny_llama, trained_bpe_tokenizer

from restspec.decode.budget import FixedBudget

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTEXT_LENGTH = 96
"""max_position_embeddings of the tiny model: small, so a too-long prompt is cheap to make."""
VOCAB_TRAINING_SIZE = 320
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(name)\n",
    "Speculative decoding drafts tokens and verifies them in one forward pass.",
] * 8
SERVER_START_TIMEOUT_S = 10.0


def build_model_folder(folder: Path, context_length: int = CONTEXT_LENGTH) -> Path:
    """A random tiny Llama (never trained) and its tokenizer, trained on CORPUS, saved in ``folder``."""
    tokenizer = trained_bpe_tokenizer(CORPUS, vocab_size=VOCAB_TRAINING_SIZE)
    tokenizer.save_pretrained(folder)
    model = tiny_llama(tokenizer, max_position_embeddings=context_length, bos_token_id=None)
    model.save_pretrained(folder)
    return folder


def free_loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running_server(app) -> Iterator[str]:
    """A real uvicorn server for ``app`` on 127.0.0.1 (a free port), in a thread; yields its base URL."""
    import uvicorn

    sock = free_loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SERVER_START_TIMEOUT_S)
        sock.close()


class LookupDrafter:
    """Prompt lookup as a test drafter: after the last earlier occurrence of the context's final token,
    draft the tokens that followed it as a chain. A tiny random model falls into loops under greedy
    decoding, so these drafts get accepted and the speculative statistics move."""

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        return None

    def propose(self, context: np.ndarray, budget: int):
        from restspec.draft.tree import DraftTree

        earlier = np.flatnonzero(context[:-1] == context[-1])
        if budget == 0 or len(earlier) == 0:
            return DraftTree.empty()
        start = int(earlier[-1]) + 1
        return DraftTree.chain(context[start : start + budget])

    def observe(self, step) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        return None

    def stop_request(self, request: int = 0) -> None:
        return None


class HistoryOnlyDrafter:
    """Drafts only from past outputs (never from the request's own context): after the last earlier
    occurrence of the context's final token in the history, the tokens that followed it. What it
    accepts therefore measures which past outputs it holds, the signal tenancy must keep apart."""

    def __init__(self) -> None:
        self.history = np.zeros(0, np.int32)
        self._current: dict[int, list[np.ndarray]] = {}  # per request in flight: its output so far

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        self._current[request] = []

    def propose(self, context: np.ndarray, budget: int):
        from restspec.draft.tree import DraftTree

        earlier = np.flatnonzero(self.history[:-1] == context[-1])
        if budget == 0 or len(earlier) == 0:
            return DraftTree.empty()
        start = int(earlier[-1]) + 1
        return DraftTree.chain(self.history[start : start + budget])

    def observe(self, step) -> None:
        self.remember(step.accepted, step.request)

    def remember(self, accepted: np.ndarray, request: int = 0) -> None:
        """Add tokens a step accepted to the output of ``request``."""
        self._current[request].append(np.asarray(accepted, np.int32))

    def stop_request(self, request: int = 0) -> None:
        self.history = np.concatenate([self.history, *self._current.pop(request)])

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"history"}:
            raise ValueError(f"a HistoryOnlyDrafter state has the key 'history', got {sorted(state)}")
        self.history = np.asarray(state["history"], np.int32)


class GeneratorWrapper:
    """A generator around a real one (its model, drafter and batch): subclasses change ``stream``."""

    def __init__(self, real) -> None:
        self.real = real
        self.layout = real.layout
        self.drafter = real.drafter
        self.max_batch = real.max_batch
        self.tokenizer = real.tokenizer
        self.encode = real.encode

    def stream(self, prompt, config, *, chat=False, drafter=None, prefix_scope=None):
        return self.real.stream(prompt, config, chat=chat, drafter=drafter, prefix_scope=prefix_scope)


class WedgedGenerator(GeneratorWrapper):
    """A generator whose stream gives its first chunk, then hangs until :meth:`release` (a worker stuck
    in a step: a deadlock, a hung device)."""

    def __init__(self, real) -> None:
        super().__init__(real)
        self.released = threading.Event()

    def stream(self, prompt, config, *, chat=False, drafter=None, prefix_scope=None):
        chunks = super().stream(prompt, config, chat=chat, drafter=drafter, prefix_scope=prefix_scope)
        try:
            yield next(chunks)
            self.released.wait()
            yield from chunks
        finally:
            chunks.close()

    def release(self) -> None:
        self.released.set()


GATE_TIMEOUT_S = 10.0
"""How long a gated stream waits for the others (a worker that runs fewer jobs at once never lets
them all arrive: the gate then breaks and the requests fail)."""


class GatedGenerator(GeneratorWrapper):
    """With :meth:`gate` set to n, each of the next n streams waits until all n have begun, so that
    they enter the generator's batch together."""

    def __init__(self, real) -> None:
        super().__init__(real)
        self.barrier: threading.Barrier | None = None

    def gate(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=GATE_TIMEOUT_S)

    def stream(self, prompt, config, *, chat=False, drafter=None, prefix_scope=None):
        if self.barrier is not None:
            self.barrier.wait()
        yield from super().stream(prompt, config, chat=chat, drafter=drafter, prefix_scope=prefix_scope)


@dataclass(frozen=True)
class BatchLog(FixedBudget):
    """A fixed budget that records, for every request's step, how many requests shared its forward,
    and sleeps ``delay_s`` in each (so that requests last long enough to overlap)."""

    delay_s: float = 0.0
    batch_sizes: list = field(default_factory=list)

    def observe(self, step) -> None:
        self.batch_sizes.append(step.batch_size)
        time.sleep(self.delay_s)


class SlowDrafter(LookupDrafter):
    """LookupDrafter that sleeps in every step, so a request takes long enough to be interrupted."""

    def __init__(self, step_delay_s: float) -> None:
        self.step_delay_s = step_delay_s
        self.active: set[int] = set()  # requests in flight
        self.requests_started = 0
        self.requests_stopped = 0

    def start_request(self, prompt: np.ndarray, request: int = 0) -> None:
        self.active.add(request)
        self.requests_started += 1

    def propose(self, context: np.ndarray, budget: int):
        time.sleep(self.step_delay_s)
        return super().propose(context, budget)

    def stop_request(self, request: int = 0) -> None:
        self.active.remove(request)
        self.requests_stopped += 1


def sse_events(lines) -> list:
    """The JSON payloads of an SSE body's ``data:`` lines, then the string ``"[DONE]"`` if it came."""
    import json

    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"
            continue
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


MODEL_ID = "tiny-llama"
MODEL_ALIAS = "tiny"
IDLE_HEALTH = {"status": "ok", "model": MODEL_ID, "busy": False, "running": 0, "queued": 0}
"""``GET /health`` of the test app while nothing runs or waits."""
DEFAULT_MAX_TOKENS = 12
"""max_tokens of a request that leaves it out, in the test app."""
DRAFT_BUDGET = 4


def slow_generator(tiny_model, step_delay_s: float):
    """A generator over the tiny model whose every step sleeps ``step_delay_s`` (budget 1: at most two
    tokens a step), so that requests last long enough to queue, time out or be shut down."""
    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    return SpeculativeGenerator(model, tokenizer, drafter=SlowDrafter(step_delay_s), budget=1)


def make_app(generator, new_drafter=None, **config):
    """The app over ``generator``; other tenants' drafters are copies of its drafter as it is now
    (unless ``new_drafter`` builds them)."""
    import copy

    from restspec.decode import GenerationConfig
    from restspec.serve import ServerConfig, create_app

    config.setdefault("aliases", (MODEL_ALIAS,))
    config.setdefault("defaults", GenerationConfig(max_new_tokens=DEFAULT_MAX_TOKENS))
    startup = copy.deepcopy(generator.drafter)
    new_drafter = new_drafter or (lambda: copy.deepcopy(startup))
    return create_app(generator, ServerConfig(MODEL_ID, **config), new_drafter=new_drafter)
