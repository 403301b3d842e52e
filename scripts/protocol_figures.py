"""Draw each federated method's protocol (who holds what, what crosses the wire) from the method table.

    .venv/bin/python scripts/protocol_figures.py            # writes docs/figures/protocol_<shape>.png

One picture per kind of client (:class:`fedsp.methods.table.ClientShape`): the server with the global
model and its own shard, two of the K clients with their private rows, and the messages, labelled from
the table entry: what is shipped once, what travels each round. The methods page shows them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from fedsp.methods.table import AUXILIARY, GLOBAL, METHOD_SPECS, SPLIT_HEAD  # noqa: E402

# What each kind of client holds, what the server ships once, and a round's messages (down, up).
SHAPES = {
    "fedsp": (
        AUXILIARY,
        "auxiliary model\n(a few global layers; FedSP: shared\nacross depth, distilled)",
        "auxiliary model (once)",
        [("prefix", "down"), ("tuned prefix, N_k", "up")],
        "server: average prefixes (N_k / N),\nthen tune them on the global model",
    ),
    "fedprompt": (
        GLOBAL,
        "the whole global model\n(frozen: no model privacy)",
        "global model (once)",
        [("prefix", "down"), ("tuned prefix, N_k", "up")],
        "server: average prefixes (N_k / N)",
    ),
    "sfprompt": (
        SPLIT_HEAD,
        "head: embeddings + layers 0..c-1\ntail: final norm (+ tied LM head)",
        "head + tail (once)",
        [("prompts + tail", "down"), ("activations, grads", "both"), ("prompts + tail", "up")],
        "server: runs the body (layers c..L-1)\nfor every split step, averages",
    ),
}


def draw(name: str, out: Path) -> Path:
    holds, client_text, once, messages, server_text = SHAPES[name]
    methods = [s.name for s in METHOD_SPECS.values() if s.client is not None and s.client.holds == holds]
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6)
    ax.axis("off")

    def box(x: float, y: float, w: float, h: float, title: str, body: str, colour: str) -> None:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", fc=colour, ec="#333333"))
        ax.text(x + w / 2, y + h - 0.25, title, ha="center", va="top", fontsize=10, weight="bold")
        ax.text(x + w / 2, y + h / 2 - 0.2, body, ha="center", va="center", fontsize=8)

    box(
        3.0, 4.0, 4.0, 1.7, "server (model owner)", f"global model, its own shard 0\n{server_text}", "#dbe8f6"
    )
    for i, x in enumerate((0.3, 5.7)):
        box(x, 0.2, 4.0, 1.7, f"client {i + 1} of K (data owner)", f"private rows\n{client_text}", "#e3f2df")

    def arrow(x0: float, y0: float, x1: float, y1: float, label: str, colour: str) -> None:
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color=colour))
        ax.text(
            (x0 + x1) / 2 + 0.15, (y0 + y1) / 2, label, fontsize=7.5, ha="left", va="center", color=colour
        )

    arrow(6.6, 4.0, 7.7, 1.95, once, "#777777")
    colours = {"down": ("#2f6db5", "-|>"), "up": ("#b0413e", "-|>"), "both": ("#7a5195", "<|-|>")}
    for n, (label, way) in enumerate(messages):
        x = 2.6 + 0.5 * n
        colour, style = colours[way]
        start, end = ((x + 1.0, 4.0), (x, 1.95)) if way == "down" else ((x, 1.95), (x + 1.0, 4.0))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=1.4))
        ax.text(2.15, 3.55 - 0.45 * n, label, fontsize=7.5, ha="right", va="center", color=colour)
    ax.text(0.3, 2.45, "each round", fontsize=8, style="italic", color="#444444")
    ax.set_title(f"clients of {', '.join(methods)}: who holds what, what crosses the wire", fontsize=9.5)
    path = out / f"protocol_{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "figures"))
    args = parser.parse_args()
    for name in SHAPES:
        print(draw(name, Path(args.out)))


if __name__ == "__main__":
    main()
