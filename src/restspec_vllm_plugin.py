"""The ``vllm.general_plugins`` entry point: registers restspec's drafter as vLLM's speculative method
``"restspec"`` (vLLM 0.34+, :mod:`restspec.integrations.vllm_speculator`).

vLLM calls :func:`register` in every process it starts, before the worker sets up, and stops if it
raises. So this is a module of its own outside the ``restspec`` package, and imports nothing of
restspec: importing ``restspec`` imports numba and llvmlite, and on vLLM 0.32's CPU backend a worker
that has llvmlite loaded when it starts fails (0.32's Triton-kernel override scan trips over
llvmlite's ``ffi.lib``; fixed in 0.34). On vLLM 0.32/0.33, which have no method registry (restspec
drafts there as ``custom_class``, :mod:`restspec.integrations.vllm`), it only logs why (at INFO, on
this module's logger) and imports nothing of vLLM. On 0.34 the method's config is registered by
name, and vLLM imports it only when a speculative config names ``"restspec"``."""

from __future__ import annotations

import logging
import re

METHOD = "restspec"
"""The ``method`` of vLLM's speculative config that selects restspec's drafter."""
CONFIG_CLASS = "restspec.integrations.vllm_speculator_config.RestspecSpeculatorConfig"
FIRST_VERSION = (0, 34)
"""The first vLLM with ``register_speculative_method``."""

logger = logging.getLogger(__name__)


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string (``0.34.0``, ``0.32.0+cpu``, ``0.35.0rc1.dev12+g1a2b``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def register() -> bool:
    """Register :data:`METHOD` with vLLM; False (and a log line saying why) when this vLLM cannot."""
    try:
        import vllm
    except ImportError:
        logger.info("restspec: vLLM is not installed; the speculative method %r is not registered", METHOD)
        return False
    version = str(getattr(vllm, "__version__", ""))
    found = release(version)
    if found is not None and found < FIRST_VERSION:
        logger.info(
            "restspec: vLLM %s predates custom speculative methods (0.34), so %r is not registered; on "
            'vLLM 0.32/0.33 use {"method": "custom_class", "model": '
            '"restspec.integrations.vllm.RestspecProposer"} (docs/vllm.md)',
            version,
            METHOD,
        )
        return False
    try:
        from vllm.v1.worker.gpu.spec_decode.speculator_config import register_speculative_method

        register_speculative_method(METHOD, CONFIG_CLASS)
    except Exception as exc:  # a vLLM that changed the interface must still start
        logger.warning(
            "restspec: could not register the speculative method %r with vLLM %s: %s", METHOD, version, exc
        )
        return False
    return True
