"""``restspec bench`` with the research methods of :mod:`benchmarks.methods` (REST, SuffixDecoding, fixed
budgets, ...): the same options, runner, report and JSON.

    python -m benchmarks.bench --workload humaneval --limit 20 --methods plain,pld,rest,restspec,suffix
        --json benchmarks/results/bench-humaneval.json --markdown benchmarks/results/bench-humaneval.md

Without ``--methods`` it runs :data:`DEFAULT_METHODS`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks.methods import LAB_METHODS
from restspec.bench import main as bench_main

DEFAULT_METHODS = "plain,pld,rest,restspec,restspec-plain,suffix"
"""The published baselines next to restspec (the runs of docs/benchmarks.md)."""


def main(argv: Sequence[str]) -> None:
    args = list(argv)
    if not any(a == "--methods" or a.startswith("--methods=") for a in args):
        args += ["--methods", DEFAULT_METHODS]
    bench_main(args, extra_methods=LAB_METHODS, prog_name="python -m benchmarks.bench")


if __name__ == "__main__":
    main(sys.argv[1:])
