"""The ``vllm.general_plugins`` entry point never stops vLLM: on a vLLM without the speculative method
registry (or without vLLM) it registers nothing and says why. Fake ``vllm`` modules stand in, so this
runs anywhere; test_vllm_v034.py registers through vLLM 0.34's own plugin loader."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import ModuleType

import pytest

from restspec_vllm_plugin import register, release


def fake_vllm(version: str) -> ModuleType:
    module = ModuleType("vllm")
    module.__version__ = version
    return module


def test_loading_the_plugin_imports_neither_restspec_nor_numba():
    # vLLM loads it in every process before a worker starts; vLLM 0.32's CPU worker fails to start
    # with llvmlite (numba's) loaded, and every process would pay restspec's imports
    code = (
        "import sys, restspec_vllm_plugin; restspec_vllm_plugin.register(); "
        "print(sorted(m for m in ('restspec', 'numba', 'llvmlite') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_release_reads_major_and_minor():
    assert release("0.34.0") == (0, 34)
    assert release("0.32.0+cpu") == (0, 32)
    assert release("0.35.0rc1.dev12+g1a2b") == (0, 35)
    assert release("unknown") is None


def test_register_without_vllm_or_with_an_older_one_registers_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="restspec_vllm_plugin")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    assert register() is False
    assert "vLLM is not installed" in caplog.text
    for version in ("0.32.0+cpu", "0.33.1"):
        monkeypatch.setitem(sys.modules, "vllm", fake_vllm(version))
        assert register() is False
        assert f"vLLM {version} predates custom speculative methods" in caplog.text


REGISTRY = "vllm.v1.worker.gpu.spec_decode.speculator_config"


def refuse(name: str, config: str) -> None:
    raise ValueError(f"Speculative method {name!r} is already registered.")


@pytest.mark.parametrize("version", ["0.34.0", "not-a-version"])
def test_register_survives_a_vllm_whose_registry_fails(monkeypatch, caplog, version):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(version))
    registry = ModuleType(REGISTRY)
    registry.register_speculative_method = refuse
    monkeypatch.setitem(sys.modules, REGISTRY, registry)
    assert register() is False
    assert "could not register the speculative method 'restspec'" in caplog.text
    assert "already registered" in caplog.text
    monkeypatch.setitem(sys.modules, REGISTRY, None)  # a vLLM without the registry's module
    assert register() is False
