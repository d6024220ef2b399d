"""restspec's own evaluation set (README.md): ``python -m benchmarks.evalset.build`` writes evalset.jsonl."""
