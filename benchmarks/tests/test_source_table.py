"""The per-source table: each source alone and the default mix without it, replayed (no model)."""

from __future__ import annotations

import numpy as np
from replay_refs import VOCAB, reference

from benchmarks.sources import markdown, measure, variants
from restspec.decode.budget import LatencyCurve


def test_every_variant_replays_and_the_table_shows_the_change_against_the_mix():
    # a repetitive output: the context and recycling sources both learn it
    refs = [
        reference("a", [1, 2, 3, 1, 2], [3, 1, 2, 3, 1, 2, 3, 4]),
        reference("b", [5, 6], [5, 6, 5, 6, 7]),
    ]
    rows = variants([], VOCAB)
    assert {"default", "context", "recycle", "-context", "-recycle", "-pairs", "-agreement", "-both"} <= set(
        rows
    )
    cells = {
        "w": {
            name: measure(refs, factory, VOCAB, 4, LatencyCurve.reference())
            for name, (_, factory) in rows.items()
        }
    }
    assert all(c.fixed >= 1.0 and c.adaptive >= 1.0 for c in cells["w"].values())
    assert cells["w"]["default"].fixed > 1.0
    text = markdown(cells, {name: note for name, (note, _) in rows.items()}, 4)
    lines = text.splitlines()
    assert lines[0].startswith("| drafter | what | w: b=4 |")
    minus = next(line for line in lines if line.startswith("| -context |"))
    change = cells["w"]["-context"].fixed - cells["w"]["default"].fixed
    assert f"({change:+.3f})" in minus


def test_ablated_recycling_rates_depend_on_the_rank_alone():
    from benchmarks.sources import RecycleByRankOnly

    rates = RecycleByRankOnly(VOCAB, k=3).rates
    assert rates.shape == (2, 3, 4)
    assert np.all(rates == rates[:1, :, :1])  # the same for both row kinds and every rank before
