"""The lab tests' fixtures (tests/bench_fixtures.py)."""

from bench_fixtures import datastore, quick_warm_start, tiny_model, tiny_tokenizer  # noqa: F401
