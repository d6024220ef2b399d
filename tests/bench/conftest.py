"""The bench tests' fixtures (tests/bench_fixtures.py)."""

from bench_fixtures import (  # noqa: F401
    datastore,
    quick_warm_start,
    tiny_engine,
    tiny_model,
    tiny_model_folder,
    tiny_tokenizer,
)
