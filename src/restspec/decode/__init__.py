"""Decoding: tree verification on any HF causal LM, acceptance, the one generate loop."""
