"""restspec's lab: research baselines, replays and measurements, run from the repository root as
``python -m benchmarks.<script>`` (see benchmarks/README.md). Not installed with restspec; nothing in
``src/restspec`` imports it."""
