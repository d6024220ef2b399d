"""Pure-numpy :func:`~restspec.draft.select_tree`: the reference the numba kernel is tested against.

The rows are sorted lexicographically (tokens packed several to an int64 key, then one
``np.lexsort``); in sorted order rows sharing a prefix are contiguous, so a node is a run of equal
prefixes in one column and its count is the run's length. No per-token Python loop.
"""

from __future__ import annotations

import numpy as np

from restspec.draft.tree import DraftTree

_KEY_BITS = 62
"""Bits of an int64 sort key used for packed tokens (kept below 63 so keys stay non-negative)."""


def _sort_rows(rows: np.ndarray) -> np.ndarray:
    """Row order that sorts ``rows`` (int64[k, m], values >= 0) lexicographically; stable."""
    m = rows.shape[1]
    bits = max(int(rows.max()).bit_length(), 1)
    per_key = max(_KEY_BITS // bits, 1)
    keys = []
    for start in range(0, m, per_key):
        block = rows[:, start : start + per_key]
        shifts = np.arange(block.shape[1] - 1, -1, -1, dtype=np.int64) * bits
        keys.append((block << shifts).sum(axis=1))
    if len(keys) == 1:
        return np.argsort(keys[0], kind="stable")
    return np.lexsort(keys[::-1])  # lexsort's last key is the primary one


def count_trie(continuations: np.ndarray):
    """Count every prefix of the rows of ``continuations`` (int32[k, m], -1 padded).

    Returns ``(tokens, depths, counts, parents, order)`` over all trie nodes, each int64[N]: a node's
    last token, depth (1 = first token), number of rows with its prefix, index of its parent node
    (-1 for depth 1) and its rank in (path-lexicographic) order; nodes are listed column by column.
    """
    cont = np.asarray(continuations)
    if cont.ndim != 2:
        raise ValueError(f"continuations must be 2-D [k, m], got shape {cont.shape}")
    k, m = cont.shape
    if k == 0 or m == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty, empty
    # (k, m): a token counts only while the row has had no -1 yet; shift so padding is 0
    valid = np.logical_and.accumulate(cont >= 0, axis=1)
    shifted = np.where(valid, cont.astype(np.int64) + 1, 0)
    order = _sort_rows(shifted)
    rows = shifted[order]  # (k, m), lexicographically sorted
    # new[i, j]: row i starts a new prefix of length j + 1 (differs from row i - 1 at some column <= j)
    new = np.empty((k, m), dtype=bool)
    new[0] = True
    np.logical_or.accumulate(rows[1:] != rows[:-1], axis=1, out=new[1:])
    # run ids per column, numbered globally column by column: node_of[i, j]
    new_t = new.T  # (m, k)
    run_counts = new_t.sum(axis=1)
    offsets = np.concatenate(([0], np.cumsum(run_counts)[:-1]))
    node_of = np.cumsum(new_t, axis=1) - 1 + offsets[:, None]  # (m, k)
    col, start = np.nonzero(new_t)  # every run: column and first row, column-major like node ids
    total = len(col)
    next_start = np.empty(total, np.int64)
    next_start[:-1] = start[1:]
    next_start[offsets[1:] - 1] = k  # the last run of each column ends at row k
    next_start[-1] = k
    counts = next_start - start
    tokens = rows[start, col] - 1
    parents = np.where(col > 0, node_of[np.maximum(col - 1, 0), start], -1)
    keep = tokens >= 0
    # renumber the kept (real-token) nodes; a kept node's parent is kept too (padding is a suffix)
    new_index = np.cumsum(keep) - 1
    parents = np.where(parents >= 0, new_index[np.maximum(parents, 0)], -1)[keep]
    return tokens[keep], (col + 1)[keep], counts[keep], parents, start[keep]


def select_tree_numpy(continuations: np.ndarray, budget: int) -> DraftTree:
    """Pure-numpy :func:`select_tree` (the reference the numba kernel is tested against).

    Nodes are ordered by count (descending), then depth (ascending), then path token ids; parents
    precede children. ``weights[i] = count_i / k``, the fraction of rows with node i's prefix.
    """
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0")
    tokens, depths, counts, parents, lex = count_trie(continuations)
    n = len(tokens)
    if n == 0 or budget == 0:
        return DraftTree.empty()
    k, m = np.shape(continuations)
    # one int64 key per node: count desc, depth asc, lexicographic path order asc
    key = ((k - counts) * (m + 1) + depths) * (k + 1) + lex
    if budget < n:
        chosen = np.argpartition(key, budget - 1)[:budget]
        chosen = chosen[np.argsort(key[chosen], kind="stable")]
    else:
        chosen = np.argsort(key, kind="stable")
    position = np.full(n, -1, np.int64)
    position[chosen] = np.arange(len(chosen))
    sel_parents = parents[chosen]
    tree_parents = np.where(sel_parents >= 0, position[np.maximum(sel_parents, 0)], -1)
    return DraftTree(tokens[chosen], tree_parents, counts[chosen] / k)
