"""benchmarks.forward_versions: the direct forward at a revision against the working tree's."""

from __future__ import annotations

import numpy as np

from benchmarks.forward_versions import WIDTHS, measure, module_at


def test_the_same_forward_at_head_times_every_width_and_is_bitwise_itself(tiny_model):
    base = module_at("HEAD")
    assert base.__name__ == "direct_base" and hasattr(base, "DirectForward")
    context = np.random.default_rng(0).integers(0, 100, size=40)
    medians, same = measure(tiny_model.float(), base, None, context, rounds=1)
    assert {"base stock", "current stock"} <= set(medians)
    assert all(set(by) == set(WIDTHS) and min(by.values()) > 0 for by in medians.values())
    assert same and all(same.values())
