"""The privacy and robustness grid of docs/results.md: one ``fedsp run`` per cell, then its tables.

    .venv/bin/python scripts/protection_grid.py --out results/protection [--jobs 2] [--only dp|attacks]

Every cell is SmolLM2 on ARC-Easy at the CPU scale (``--scale cpu`` of ``fedsp compare``, with 10
clients), evaluated on the same first 500 test questions. The DP cells run FedSP as it is. The
attack cells run FedPrompt with ``--server-steps 0`` (the paper's FedPrompt: the prefix moves only by
the clients' aggregate): at this scale FedSP's clients' prefixes alone do not lower the global
model's validation loss (its server step on its own shard does), so an attack on them cannot show
(the ``fedsp-ss0-`` and ``ss2-`` cells, run by hand with FedSP, show it). A finished cell (its
``results.json``) is reused, so the command can be run again after an interruption. ``--jobs 2``
runs two cells at once, each on one thread (accuracy does not depend on it; wall times then do not
measure speed).
Tables go to ``<out>/dp.md`` and ``<out>/attacks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FEDSP = str(Path(sys.executable).with_name("fedsp"))
BASE = [
    "--task", "arc_easy", "--rounds", "2", "--local-steps", "2", "--kd-steps", "10", "--val-limit", "50",
    "--eval-limit", "500", "--eval-every-round", "false", "--zero-shot-eval", "false", "--quiet",
]  # fmt: skip
DP_CLIP = "5"  # --dp-clip: about half a clean update's norm here (9.0 in round 1; update_norms in metrics)
CLIP = "10"  # clipped-mean's C: just above a clean update's norm
EPSILONS = ("1", "4", "8", "16")
RULES = ("mean", "median", "trimmed-mean:3", f"clipped-mean:{CLIP}")
ATTACKS = ("sign-flip", "scale:-5", "gaussian:0.05", "same-value:0.05")


def cells(only: str | None) -> dict[str, list[str]]:
    """Cell name -> its options beyond BASE, the most telling first (a grid cut short keeps those)."""
    dp: dict[str, list[str]] = {}
    for eps in ("none", "8", "16", "1", "4"):
        for clients, fraction in (("100", "0.1"), ("10", "1")):
            options = ["--clients", clients, "--fraction-fit", fraction]
            if eps != "none":
                options += ["--dp-epsilon", eps, "--dp-delta", "1e-5", "--dp-clip", DP_CLIP]
            dp[f"dp-k{clients}-{'none' if eps == 'none' else 'eps' + eps}"] = options
    attacks: dict[str, list[str]] = {}
    plans = [("0", "", "")] + [("3", "1,4,7", attack) for attack in ATTACKS]
    plans += [("1", "3", attack) for attack in ATTACKS]
    for count, attackers, attack in plans:
        for rule in RULES:
            name = cell_name(count, attack, rule)
            options = ["--method", "fedprompt", "--clients", "10", "--server-steps", "0"]
            options += ["--aggregation", rule]
            if attack:
                options += ["--attack", attack, "--attackers", attackers]
            attacks[name] = options
    if only == "dp":
        return dp
    if only == "attacks":
        return attacks
    # interleaved: the headline cells of both tables first
    order = list(dp)[:2] + list(attacks)[:12] + list(dp)[2:6] + list(attacks)[12:] + list(dp)[6:]
    both = {**dp, **attacks}
    return {name: both[name] for name in order}


def cell_name(count: str, attack: str, rule: str) -> str:
    if count == "0":
        return f"fp-atk0-{rule.split(':')[0]}"
    return f"fp-atk{count}-{attack.split(':')[0]}-{rule.split(':')[0]}"


def run_cell(root: Path, name: str, options: list[str]) -> str:
    folder = root / "cells" / name
    if (folder / "results.json").is_file():
        return f"{name}: reused"
    if folder.exists():  # an interrupted cell: resume it
        command = [FEDSP, "run", "--resume", str(folder), "--quiet"]
    else:
        command = [FEDSP, "run", *BASE, *options, "--out", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("GRID_THREADS", "1")}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
    status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
    return f"{name}: {status} in {time.perf_counter() - started:.0f} s"


def load(root: Path, name: str) -> dict | None:
    path = root / "cells" / name / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def dp_table(root: Path) -> str:
    lines = [
        "| clients (a round) | epsilon (delta 1e-5) | noise multiplier | clip | rounds | acc | acc_norm | "
        "best round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, per_round in (("10", 10), ("100", 10)):
        for eps in ("none", *EPSILONS):
            res = load(root, f"dp-k{clients}-{'none' if eps == 'none' else 'eps' + eps}")
            if res is None:
                continue
            privacy = res.get("privacy") or {}
            spent = f"{privacy['epsilon']:.2f} (budget {eps})" if privacy else "no DP"
            noise = f"{privacy['noise_multiplier']:.3f}" if privacy else "-"
            clip = f"{privacy['clip']:g}" if privacy else "-"
            final = res["final"]
            lines.append(
                f"| {clients} ({per_round}) | {spent} | {noise} | {clip} | {res['rounds_completed']} | "
                f"{100 * final['acc']:.1f} | {100 * final['acc_norm']:.1f} | {res['best_round']} |"
            )
    return "\n".join(lines) + "\n"


def last_val_loss(root: Path, name: str) -> float:
    lines = (root / "cells" / name / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["val_loss"])


def attack_table(root: Path, prefix: str = "") -> str:
    header = "| attackers | attack | " + " | ".join(RULES) + " |"
    lines = [header, "|---|---|" + "---|" * len(RULES)]
    rows = [("0", "none")] + [("1", a) for a in ATTACKS] + [("3", a) for a in ATTACKS]
    for count, attack in rows:
        values = []
        for rule in RULES:
            name = cell_name(count, attack, rule)
            if prefix:  # FedSP cells, run by hand; with no attack and FedAvg: the DP table's run
                name = name.removeprefix("fp-")
                name = "dp-k10-none" if prefix == "ss2-" and name == "atk0-mean" else prefix + name
            res = load(root, name)
            cell = "–"
            if res:
                last = last_val_loss(root, name)
                cell = f"{100 * res['final']['acc']:.1f} (r{res['best_round']}, {last:.3f})"
            values.append(cell)
        lines.append(f"| {count} of 10 | {attack} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/protection")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", choices=("dp", "attacks"))
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--cells", help="comma-separated cell names to run (default: all)")
    args = parser.parse_args()
    root = Path(args.out)
    todo = cells(args.only)
    if args.cells:
        wanted = args.cells.split(",")
        todo = {k: v for k, v in todo.items() if k in wanted}
    if not args.tables_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda item: run_cell(root, *item), todo.items()):
                print(line, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dp.md").write_text(dp_table(root))
    (root / "attacks.md").write_text(
        attack_table(root)
        + "\nFedSP with its server step (2 steps a round on its own shard):\n\n"
        + attack_table(root, "ss2-")
        + "\nFedSP without its server step (--server-steps 0):\n\n"
        + attack_table(root, "fedsp-ss0-")
    )
    print((root / "dp.md").read_text())
    print((root / "attacks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
