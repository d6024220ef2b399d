"""restspec CLI commands (placeholder until written)."""
