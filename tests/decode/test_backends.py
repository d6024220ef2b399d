"""Forward backends: each agrees with the model's own forward (bitwise where it runs the same kernels),
none writes into the model or ``os.environ``, and ``choose_backend`` keeps the fastest one that passes
the exactness probe, cached per machine + model + dtype + device."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import ARCHS, VOCAB, IdTokenizer, OracleDrafter, gguf_model, plain_greedy, tiny_model
from machine import quiet_machine, snapshots

from restspec.decode import GenerationConfig, ModelForward, SpeculativeGenerator, choose_backend
from restspec.decode import backends as backends_module
from restspec.decode import blocks as blocks_module
from restspec.decode.backends import (
    BackendChoice,
    backend_by_name,
    candidates,
    choice_path,
    fastest,
    probe,
)
from restspec.decode.budget import ForwardLatencyProbe
from restspec.decode.kernels import available as packed_available
from restspec.draft.base import EmptyDrafter
from restspec.errors import GenerationError, ModelError

EXPECTED = {
    # the direct forwards: Llama-family decoders without mixed sliding/full layers (direct-packed: in
    # float32 on the CPU); gemma builds them but fails the probe
    "llama": {"model", "direct", "direct-packed"},
    "qwen2": {"model", "direct", "direct-packed"},
    "mistral": {"model", "direct", "direct-packed"},
    "gemma": {"model", "direct", "direct-packed"},
    "qwen2-hybrid": {"model"},
    "gemma2": {"model"},
    "phi3": {"model"},
    "gpt2": {"model"},
}
PASSING = {**EXPECTED, "gemma": {"model"}}


def tiny32(arch: str) -> torch.nn.Module:
    return copy.deepcopy(tiny_model(arch)).to(torch.float32)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTSPEC_CACHE", str(tmp_path))
    quiet_machine(monkeypatch)  # choices are cached only when timed on a quiet machine
    return tmp_path


@pytest.mark.skipif(not packed_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("arch", ARCHS)
def test_every_backend_that_passes_the_probe_generates_the_models_greedy_output(arch):
    model = tiny32(arch)
    found = candidates(model)
    assert {b.name for b in found} == EXPECTED[arch]
    assert found[0].name == "model"
    passed = {b.name for b in found if probe(b).passed}
    assert passed == PASSING[arch]
    prompt = np.random.default_rng(5).integers(0, VOCAB, size=11).tolist()
    expected = plain_greedy(model, prompt, 16)
    for backend in found:
        if backend.name in passed:
            drafter = OracleDrafter(prompt + expected, "mixed", VOCAB)
            gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=6, backend=backend)
            result = gen.generate(prompt, GenerationConfig(max_new_tokens=16))
            assert result.output_ids.tolist() == expected, backend.name


def test_exact_backends_must_be_bitwise_and_packed_ones_close(monkeypatch):
    model = tiny32("llama")
    direct = backend_by_name(model, "direct")
    assert probe(direct) == backends_module.ProbeResult(True, 0.0)

    def nudged(backend):  # the backend's logits, off by one part in a million
        run = backends_module._probe_run

        def off(b):
            logits, rows = run(b)
            return (logits * (1 + 1e-6), rows) if b is backend else (logits, rows)

        return off

    monkeypatch.setattr(backends_module, "_probe_run", nudged(direct))
    assert not probe(direct).passed  # the same kernels: any difference is a failure
    if packed_available():
        packed = backend_by_name(model, "direct-packed")
        monkeypatch.setattr(backends_module, "_probe_run", nudged(packed))
        assert probe(packed).passed  # other kernels: rounding is allowed


def snapshot(model) -> tuple[dict, list[torch.Tensor], dict]:
    """Every module's attributes (names and identities, dict contents one level deep), the parameters'
    values, and the environment."""
    state = {}
    for name, module in model.named_modules():
        state[name] = {
            key: (id(value), {k: id(v) for k, v in value.items()} if isinstance(value, dict) else None)
            for key, value in vars(module).items()
        }
    params = [p.detach().clone() for p in model.parameters()]
    return state, params, dict(os.environ)


def test_choosing_and_generating_write_nothing_into_the_model_or_the_environment(cache_dir):
    model = tiny32("llama")
    before, params, env = snapshot(model)
    chosen = choose_backend(model)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for backend in candidates(model):
        SpeculativeGenerator(
            model, IdTokenizer(), OracleDrafter(prompt * 4, "mixed", VOCAB), 6, backend=backend
        ).generate(prompt, GenerationConfig(max_new_tokens=8))
    SpeculativeGenerator(model, IdTokenizer(), budget=0, backend=chosen).generate(prompt)
    after, params_after, env_after = snapshot(model)
    assert after == before
    assert all(torch.equal(a, b) for a, b in zip(params, params_after, strict=True))
    assert env_after == env


def test_choose_backend_keeps_the_fastest_passing_one_and_caches_the_choice(cache_dir, monkeypatch):
    model = tiny32("llama")
    timed = []

    def fake_times(backends, *args, **kwargs):
        timed.append([b.name for b in backends])
        # median seconds at widths 1, 8, 16: direct is faster than the model's own at every width
        table = {"model": (0.010, 0.020, 0.030), "direct": (0.009, 0.015, 0.020), "direct-packed": (1, 1, 1)}
        return {b.name: dict(zip((1, 8, 16), table[b.name], strict=True)) for b in backends}

    monkeypatch.setattr(backends_module, "time_backends", fake_times)
    real_probe = backends_module.probe
    monkeypatch.setattr(  # say the packed kernels round too differently on this machine
        backends_module,
        "probe",
        lambda b, *a: (
            backends_module.ProbeResult(False, 1.0, "too far") if not b.exact else real_probe(b, *a)
        ),
    )
    lines = []
    chosen = choose_backend(model, "cpu", progress=lines.append)
    assert chosen.name == "direct"
    assert chosen.model is model
    assert timed == [["model", "direct"]]  # only those that passed the probe were timed
    record = BackendChoice.from_json(json.loads(choice_path(model).read_text()))
    assert record.name == "direct"
    assert record.rejected == ({"direct-packed": "too far"} if packed_available() else {})
    assert record.timings["direct"][8] == pytest.approx(0.015)
    assert lines[-1].startswith("forward backend: direct")
    # cached: nothing timed again
    assert choose_backend(model).name == "direct"
    assert len(timed) == 1
    # a cached choice that fails the probe now (say, the weights changed) is made again
    choice_path(model).write_text(json.dumps(BackendChoice("direct-packed", {}, {}).to_json()))
    assert choose_backend(model).name == "direct"
    assert len(timed) == 2
    assert json.loads(choice_path(model).read_text())["backend"] == "direct"


def test_a_model_without_faster_backends_gets_its_own_forward_untimed(cache_dir, monkeypatch):
    monkeypatch.setattr(backends_module, "time_backends", lambda *a, **k: pytest.fail("nothing to time"))
    assert choose_backend(tiny32("gemma")).name == "model"  # direct fails the probe: nothing to compare


def test_a_backend_slower_than_the_models_own_at_any_width_is_not_kept():
    model = tiny32("llama")
    found = {b.name: b for b in candidates(model)}
    ms = {  # median ms at widths 1, 8, 16
        "model": (10, 20, 30),
        "direct": (9, 19, 29),  # faster everywhere
        "direct-packed": (11, 12, 15),  # least in total, but slower for plain decoding (width 1)
    }
    timings = {name: {w: t / 1e3 for w, t in zip((1, 8, 16), row, strict=True)} for name, row in ms.items()}
    order = [found[name] for name in ms if name in found]
    assert backends_module.fastest(order, timings).name == "direct"
    assert backends_module.fastest(order[:1], timings).name == "model"


def test_the_choice_is_cached_per_model_and_dtype(cache_dir):
    llama, qwen = tiny32("llama"), tiny32("qwen2")
    assert choice_path(llama) != choice_path(qwen)  # another config
    assert choice_path(llama) != choice_path(copy.deepcopy(llama).to(torch.bfloat16))
    assert choice_path(llama, "my-model").name.startswith("my-model-float32-")


def test_real_timing_runs_every_backend_at_every_width():
    model = tiny32("llama")
    found = candidates(model)
    times = backends_module.time_backends(found, (1, 3), past_len=12, rounds=2)
    assert set(times) == {b.name for b in found}
    assert all(set(t) == {1, 3} and min(t.values()) > 0 for t in times.values())


def test_the_latency_probe_times_the_backend_it_is_given():
    backend = backend_by_name(tiny32("llama"), "direct")
    latency = ForwardLatencyProbe(backend, past_len=10)
    assert latency.backend is backend and latency(4) > 0
    assert latency.cache.get_seq_length() == 10


def test_bfloat16_and_float16_models_get_no_packed_backend_and_still_generate():
    for dtype in (torch.bfloat16, torch.float16):
        model = copy.deepcopy(tiny_model("llama")).to(dtype)
        assert {b.name for b in candidates(model)} == {"model", "direct"}
        result = SpeculativeGenerator(model, IdTokenizer(), budget=0, backend=candidates(model)[1]).generate(
            [1, 2, 3], GenerationConfig(max_new_tokens=4)
        )
        assert len(result.output_ids) == 4


def test_backend_mistakes_are_errors_a_user_can_act_on():
    model, other = tiny32("llama"), tiny32("qwen2")
    with pytest.raises(GenerationError, match="another model"):
        SpeculativeGenerator(model, IdTokenizer(), backend=ModelForward(other))
    with pytest.raises(ModelError, match="'fastest' is unknown"):
        backend_by_name(model, "fastest")
    for wrong in ("direct-split@1", "direct-split@x", "direct@4", "direct-blocks-split@1", "direct-blocks@8"):
        with pytest.raises(ModelError, match="direct-split@N"):
            backend_by_name(model, wrong)
    with pytest.raises(ModelError, match="cannot run"):
        backend_by_name(tiny32("gpt2"), "direct")
    with pytest.raises(ModelError, match=r"on cpu but device='cuda'.*load_model"):
        choose_backend(model, "cuda")


def test_a_generation_prints_no_deprecation(cache_dir):
    """No FutureWarning / DeprecationWarning, and no deprecation line from transformers' logger, through
    every backend, the latency probe and transformers' own generate."""
    import transformers

    model = tiny32("llama")
    transformers.utils.logging.warning_once.cache_clear()  # messages already logged once would hide
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            prompt = [5, 4, 3, 2, 1]
            for backend in candidates(model):
                drafter = OracleDrafter(prompt * 3, "chain", VOCAB)
                SpeculativeGenerator(model, IdTokenizer(), drafter, 4, backend=backend).generate(
                    prompt, GenerationConfig(max_new_tokens=6)
                )
                ForwardLatencyProbe(backend, past_len=8)(3)
            SpeculativeGenerator(model, IdTokenizer(), EmptyDrafter(), 0).generate(prompt)
            plain_greedy(model, prompt, 6)
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]


@pytest.mark.parametrize(
    ("narrow_ms", "wide_ms", "width"),
    [
        ((40, 45, 55, 75, 83), (51, 52, 55, 64, 70), 8),  # packed ahead from 8 inputs (4: a tie, not ahead)
        ((40, 45, 55, 75, 83), (51, 44, 50, 64, 70), 2),
        ((40, 45, 55, 75, 83), (39, 44, 50, 64, 70), None),  # packed ahead everywhere: no split
        ((40, 45, 55, 60, 65), (51, 52, 56, 64, 70), None),  # stock ahead everywhere
        ((40, 45, 55, 75, 83), (51, 44, 56, 64, 70), 8),  # ahead at 2, behind at 4: from 8 on
    ],
)
def test_the_split_width_is_where_the_packed_kernels_stay_ahead(narrow_ms, wide_ms, width):
    widths = (1, 2, 4, 8, 16)
    narrow = dict(zip(widths, narrow_ms, strict=True))
    wide = dict(zip(widths, wide_ms, strict=True))
    assert backends_module.split_width(narrow, wide) == width


@pytest.mark.skipif(not packed_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize(
    ("name", "narrow_name"), [("direct-split", "direct"), ("direct-blocks-split", "direct-blocks")]
)
def test_the_split_backend_runs_each_width_on_its_member_and_keeps_the_output(name, narrow_name):
    if narrow_name == "direct-blocks" and blocks_module.kernel() is None:
        pytest.skip("no C compiler to build the block kernel")
    model = tiny32("llama") if narrow_name == "direct" else gguf_model()
    split = backend_by_name(model, name, wide_from=3)
    narrow, wide = split.members
    assert (split.name, narrow.name, wide.name, split.wide_from) == (name, narrow_name, "direct-packed", 3)
    calls = []
    for member in split.members:
        member.forward_batch = _recording(member.forward_batch, member.name, calls)
    prompt = np.random.default_rng(5).integers(0, VOCAB, size=11).tolist()
    expected = plain_greedy(model, prompt, 16)
    drafter = OracleDrafter(prompt + expected, "mixed", VOCAB)
    gen = SpeculativeGenerator(model, IdTokenizer(), drafter, budget=6, backend=split)
    assert gen.generate(prompt, GenerationConfig(max_new_tokens=16)).output_ids.tolist() == expected
    assert {name for name, width in calls if width >= 3} == {"direct-packed"}
    assert {name for name, width in calls if width < 3} <= {narrow_name}
    assert probe(split).passed


def _recording(forward_batch, name, calls):
    def run(segments):
        calls.append((name, sum(seg.width for seg in segments)))
        return forward_batch(segments)

    return run


@pytest.mark.skipif(not packed_available(), reason="torch built without oneDNN")
def test_choose_backend_splits_where_each_direct_forward_wins_at_some_widths(cache_dir, monkeypatch):
    model = tiny32("llama")
    table = {  # median ms at widths 1, 2, 4, 8, 16: the stock kernels win narrow, the packed ones wide
        "model": (45, 50, 60, 82, 89),
        "direct": (40, 45, 55, 75, 83),
        "direct-packed": (51, 52, 54, 64, 70),
    }
    monkeypatch.setattr(
        backends_module,
        "time_backends",
        lambda backends, *a, **k: {
            b.name: {w: t / 1e3 for w, t in zip((1, 2, 4, 8, 16), table[b.name], strict=True)}
            for b in backends
        },
    )
    chosen = choose_backend(model, "cpu")
    assert (chosen.name, chosen.wide_from) == ("direct-split", 4)
    record = BackendChoice.from_json(json.loads(choice_path(model).read_text()))
    assert record.wide_from == 4 and record.timings["direct-split"][1] == pytest.approx(0.040)
    again = choose_backend(model)  # from the cache, with its width
    assert (again.name, again.wide_from) == ("direct-split", 4)


@pytest.mark.skipif(not packed_available(), reason="torch built without oneDNN")
@pytest.mark.skipif(blocks_module.kernel() is None, reason="no C compiler to build the block kernel")
def test_the_block_kernel_gives_batches_to_the_packed_one_where_it_falls_behind(cache_dir, monkeypatch):
    """Measured on an AMD EPYC with AVX2 (2026-12-07): the block kernel ahead up to 16 inputs, behind
    the packed kernels on batch widths, where it is even slower than the model's own forward."""
    model = gguf_model()
    widths = (1, 2, 4, 8, 16, 32, 64)
    table = {  # median ms
        "model": (73, 126, 126, 147, 156, 206, 298),
        "direct": (64, 103, 114, 125, 147, 182, 289),
        "direct-packed": (52, 55, 65, 72, 94, 137, 230),
        "direct-blocks": (27, 32, 47, 58, 91, 158, 312),
    }
    timed = []

    def time_backends(backends, timing_widths, *a, **k):
        timed.append(tuple(timing_widths))
        return {b.name: {w: t / 1e3 for w, t in zip(widths, table[b.name], strict=True)} for b in backends}

    monkeypatch.setattr(backends_module, "time_backends", time_backends)
    chosen = choose_backend(model, "cpu")
    assert timed == [widths]
    assert (chosen.name, chosen.key) == ("direct-blocks-split", "direct-blocks-split@32")
    record = BackendChoice.from_json(json.loads(choice_path(model).read_text()))
    assert record.timings["direct-blocks-split"][64] == pytest.approx(0.230)
    assert "direct-split" not in record.timings  # the packed kernels win at every width over the stock ones
    again = choose_backend(model)
    assert (again.name, again.wide_from) == ("direct-blocks-split", 32)
    # up to 16 inputs the split and the kernel alone tie; the batch widths break the tie
    split, alone = (backend_by_name(model, n, wide_from=32) for n in ("direct-blocks-split", "direct-blocks"))
    assert all(record.timings[split.name][w] == record.timings[alone.name][w] for w in widths[:5])
    assert fastest([ModelForward(model), alone, split], record.timings) is split


@pytest.mark.skipif(not packed_available(), reason="torch built without oneDNN")
def test_a_choice_timed_on_a_busy_machine_is_used_but_not_cached(cache_dir, monkeypatch):
    model = tiny32("llama")
    table = {"model": (10, 20), "direct": (9, 19), "direct-packed": (8, 12)}
    monkeypatch.setattr(
        backends_module,
        "time_backends",
        lambda backends, *a, **k: {b.name: dict(zip((1, 16), table[b.name], strict=True)) for b in backends},
    )
    snapshots(monkeypatch, other_cores=1.0)  # another process kept a core busy while timing
    lines = []
    assert choose_backend(model, "cpu", progress=lines.append).name == "direct-packed"
    assert not choice_path(model).exists()
    assert "chosen again next time" in lines[-1]
    quiet_machine(monkeypatch)
    assert choose_backend(model, "cpu").name == "direct-packed"
    assert choice_path(model).exists()


def test_a_split_backends_latency_is_cached_under_its_split_width():
    model = tiny32("llama")
    assert backend_by_name(model, "direct").key == "direct"
    if packed_available():
        assert backend_by_name(model, "direct-split", wide_from=4).key == "direct-split@4"
        assert backend_by_name(model, "direct-split", wide_from=16).key == "direct-split@16"
        named = backend_by_name(model, "direct-split@8")  # a key names its backend
        assert named.key == "direct-split@8" and named.wide_from == 8
