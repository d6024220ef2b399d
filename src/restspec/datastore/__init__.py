"""Datastore: corpus readers, bulk tokenizing, on-disk format, memory-mapped suffix index."""
