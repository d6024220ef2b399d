"""Fixtures of the server tests: the tiny model, a generator over it and a test client of its app."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import DRAFT_BUDGET, LookupDrafter, build_model_folder, make_app


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("restspec-cache")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    """Caches `restspec serve` writes (latency calibration, warm start) go to one temporary folder per
    test session, never to ~/.cache."""
    monkeypatch.setenv("RESTSPEC_CACHE", str(_session_cache))


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(model_folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype="float32")
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_folder)


@pytest.fixture(scope="session")
def generator(tiny_model):
    from restspec.decode import SpeculativeGenerator

    model, tokenizer = tiny_model
    return SpeculativeGenerator(model, tokenizer, drafter=LookupDrafter(), budget=DRAFT_BUDGET)


@pytest.fixture(scope="session")
def app(generator):
    return make_app(generator)


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client
