"""The real ``restspec serve`` process on 127.0.0.1 under load and under SIGTERM.

16 concurrent clients send 64 requests (chat and completions, streaming and not); 4 of them leave every
stream after its first chunk. Every request must end as completed or deliberately cancelled: lost (no
answer, a cut stream) and malformed (a bad status, shape or text) must both be 0, and the server's own
/metrics must account for every request. Then SIGTERM mid-stream: the queued request gets 503, the running
stream an error event and [DONE], and the process exits by the signal, with no traceback. The figures are
in docs/server.md."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from serve_helpers import CORPUS, build_model_folder

import restspec

CLIENTS = 16
REQUESTS_PER_CLIENT = 4
LEAVING_CLIENTS = frozenset(range(3, CLIENTS, 4))
"""These clients close every stream after its first chunk."""
MAX_TOKENS = 24
CONTEXT_LENGTH = 4096
LONG_MAX_TOKENS = 4000
"""A stream long enough to be running when SIGTERM comes."""
KEY = "reliability-test-key-0123456789"
PROMPTS = ("import os\nimport sys\n\nfor name in", "The quick brown fox")
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 20.0
SHUTDOWN_GRACE_S = 0.2
PR_SET_PDEATHSIG = 1
TEST_TIMEOUT_S = 300
"""Each test's bound (pytest-timeout), start of the server included."""

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model with a long context and a datastore for it."""
    from transformers import AutoTokenizer

    from restspec.datastore import Datastore

    folder = build_model_folder(tmp_path_factory.mktemp("tiny-llama-long"), context_length=CONTEXT_LENGTH)
    datastore = folder.parent / "tiny.ds"
    Datastore.build_from_texts(CORPUS, datastore, AutoTokenizer.from_pretrained(folder), progress=False)
    return folder, datastore


class ServerProcess:
    """``restspec serve`` in a child process (killed if this one dies), on a free loopback port."""

    def __init__(self, model: Path, datastore: Path, cache: Path, *flags: str) -> None:
        key_file = cache / "keys"
        key_file.write_text(f"# test key\n{KEY}\n")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "RESTSPEC_CACHE": str(cache),
            "PYTHONPATH": os.pathsep.join([str(Path(restspec.__file__).parents[1]), *sys.path]),
            "COLUMNS": "400",  # one line per message on stderr
        }
        command = [
            sys.executable,
            "-c",
            "from restspec.cli import main; main()",
            "serve",
            *("--port", "0", "--model", str(model), "--datastore", str(datastore)),
            *("--budget", "4", "--cold-start", "--log-level", "warning", "--api-key-file", str(key_file)),
            *("--max-tokens-limit", str(CONTEXT_LENGTH), *flags),
        ]
        self.process = subprocess.Popen(
            command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while (found := re.search(r"http://127\.0\.0\.1:(\d+)/v1", "".join(self.stderr))) is None:
            assert self.process.poll() is None, "".join(self.stderr)
            assert time.monotonic() < deadline, "the server did not start: " + "".join(self.stderr)
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{found.group(1)}"
        self._wait_ready(deadline)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def _die_with_parent() -> None:
    """(child, before exec) Linux: SIGTERM the server when the test process exits, however it exits."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@pytest.fixture
def server(model_files, tmp_path, request):
    model, datastore = model_files
    process = ServerProcess(model, datastore, tmp_path, *getattr(request, "param", ()))
    yield process
    process.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def body_of(kind: int, prompt: str, *, stream: bool) -> tuple[str, dict]:
    if kind % 2 == 0:
        return "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": stream}
    messages = [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", {"messages": messages, "max_tokens": MAX_TOKENS, "stream": stream}


def text_of_choice(choice: dict, *, delta: bool) -> str:
    if "text" in choice:
        return choice["text"]
    return (choice["delta"] if delta else choice["message"]).get("content") or ""


def one_request(http: httpx.Client, kind: int, prompt: str, leave: bool) -> tuple[str, str | None]:
    """(outcome, text): outcome is completed, cancelled, lost or malformed:<why>."""
    stream = kind >= 2
    path, body = body_of(kind, prompt, stream=stream)
    try:
        if not stream:
            response = http.post(path, json=body)
            if response.status_code != 200:
                return f"malformed:status {response.status_code}", None
            answer = response.json()
            [choice] = answer["choices"]
            if choice["finish_reason"] not in ("stop", "length") or "usage" not in answer:
                return "malformed:shape", None
            return "completed", text_of_choice(choice, delta=False)
        with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return f"malformed:status {response.status_code}", None
            events, finish = [], None
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    events.append(data)
                    break
                event = json.loads(data)
                if "error" in event:
                    return "malformed:error event", None
                events.append(event)
                for choice in event["choices"]:
                    finish = choice["finish_reason"] or finish
                if leave:
                    return "cancelled", None
            if events[-1:] != ["[DONE]"] or finish is None:
                return "lost", None
            text = "".join(text_of_choice(c, delta=True) for e in events[:-1] for c in e["choices"])
            return "completed", text
    except (httpx.TransportError, json.JSONDecodeError, KeyError, ValueError):
        return "lost", None


def test_16_concurrent_clients_lose_nothing(server):
    outcomes: Counter[str] = Counter()
    texts: dict[tuple[int, str], set[str]] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as http:
            for r in range(REQUESTS_PER_CLIENT):
                kind, prompt = (i + r) % 4, PROMPTS[(i + r) % len(PROMPTS)]
                leave = i in LEAVING_CLIENTS and kind >= 2
                outcome, text = one_request(http, kind, prompt, leave)
                with lock:
                    outcomes[outcome] += 1
                    if text is not None:
                        texts.setdefault((kind % 2, prompt), set()).add(text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S * REQUESTS_PER_CLIENT)
    sent = CLIENTS * REQUESTS_PER_CLIENT
    cancelled = len(LEAVING_CLIENTS) * 2  # each client sends each of the 4 kinds once, 2 of them streams
    assert outcomes == Counter(completed=sent - cancelled, cancelled=cancelled), (
        outcomes
    )  # lost, malformed: 0
    # greedy answers: every client got the same text for the same question, streamed or not
    assert all(len(variants) == 1 for variants in texts.values()), texts

    with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as http:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while (health := http.get("/health").json())["busy"] or health["queued"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = http.get("/metrics").text
    by_outcome: Counter[str] = Counter()
    for outcome, value in re.findall(r'restspec_requests_total\{[^}]*outcome="(\w+)"\} (\S+)', metrics):
        by_outcome[outcome] += int(float(value))
    # every request has its outcome on the server too; a stream its client left may count as completed
    # there (a 24-token answer can be written in full before the server sees the connection close)
    assert set(by_outcome) <= {"completed", "cancelled"} and by_outcome.total() == sent, metrics
    assert by_outcome["cancelled"] <= cancelled


def test_oversized_requests_get_clear_errors_from_the_real_process(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as http:
        huge_body = http.post("/v1/completions", json={"prompt": "x" * (2 << 20)})
        assert huge_body.status_code == 413 and huge_body.json()["error"]["code"] == "request_too_large"
        huge_prompt = http.post("/v1/completions", json={"prompt": "def add(a, b): " * 20_000})
        assert huge_prompt.status_code == 400
        assert huge_prompt.json()["error"]["code"] == "context_length_exceeded"
        stops = http.post("/v1/completions", json={"prompt": "hi", "stop": ["y" * 300]})
        assert stops.status_code == 400 and stops.json()["error"]["param"] == "stop"
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}).status_code == 401
        assert http.get("/health").json()["status"] == "ok"


SIGTERM_BATCH = 2
"""--max-batch of the SIGTERM test: two streams run, a third request waits."""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
@pytest.mark.parametrize(
    "server", [("--shutdown-grace", str(SHUTDOWN_GRACE_S), "--max-batch", str(SIGTERM_BATCH))], indirect=True
)
def test_a_stop_signal_mid_stream_ends_the_streams_cleanly_and_refuses_the_queue(server, stop):
    results: dict[str, httpx.Response] = {}

    def queued_request() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as http:
            results["queued"] = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})

    with contextlib.ExitStack() as stack:
        http = stack.enter_context(httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S))
        streams = []
        for prompt in PROMPTS[:SIGTERM_BATCH]:
            body = {"prompt": prompt, "max_tokens": LONG_MAX_TOKENS, "stream": True}
            lines = stack.enter_context(http.stream("POST", "/v1/completions", json=body)).iter_lines()
            streams.append((lines, [next(line for line in lines if line.startswith("data: "))]))
        waiting = threading.Thread(target=queued_request)
        waiting.start()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while (health := http.get("/health").json())["queued"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert health["running"] == SIGTERM_BATCH
        signalled = time.monotonic()
        server.process.send_signal(stop)
        for lines, events in streams:
            events += [line for line in lines if line.startswith("data: ")]
    waiting.join(REQUEST_TIMEOUT_S)
    # uvicorn re-raises the signal once it has shut down, so the exit status says which ended it
    assert server.process.wait(EXIT_TIMEOUT_S) == -stop
    exit_s = time.monotonic() - signalled

    for _, events in streams:
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert len(events) > 3, "the stream should have sent text before it was ended"
    queued = results["queued"]
    assert queued.status_code == 503 and queued.json()["error"]["code"] == "server_shutting_down"
    assert exit_s < EXIT_TIMEOUT_S
    assert "Traceback" not in "".join(server.stderr)
