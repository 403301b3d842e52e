"""Every FedSP step kind on SmolLM2 with ARC-Easy batches, against the plain PEFT way, alternating.

    .venv/bin/python bench/steps.py [--dtypes float32] [--kinds server align prompt kd eval]
                                    [--batch-size 8] [--reps 3] [--profile server] [--device auto]
                                    [--out FILE]

Step kinds (one optimiser step each, AdamW + clipping as in the runs):
  server  prefix tuning on the frozen global model;
  align   client alignment: the auxiliary model trained, prefix frozen;
  prompt  client knowledge capturing: the prefix trained, auxiliary model frozen;
  kd      auxiliary model (student) trained to the global model's last hidden states;
  eval    scoring 8 ARC-Easy validation questions (32 choice sequences) with the prefix.
Paths, run in one process on the same batches, in rotating order per repetition:
  ours         the package's code (logits only where used, length buckets where they pay: float32 on a
               CPU; cached teacher / context);
  nobucket     the same without length buckets (training kinds) / without the context cache (eval);
  plain        PEFT ``PrefixTuningConfig`` on the transformers model, full logits, every row padded
               to the longest training row (eval: the longest evaluation sequence); KD computes the
               teacher every step, as a loop without a cache does.

FLOP model (per step; the same count for every path, so FLOP/s is the useful work rate):
  forward = sum over real tokens of 2 * N_mm + 4 * L * d_q * (keys attended)  +  2 * H * V per logit row,
  N_mm the decoder's matmul weights per token (SmolLM2: 106.2 M), d_q = heads * head_dim, keys
  attended = prefix + earlier tokens + itself; logit rows are the answer (or choice) tokens.
  Frozen-weight steps (server, prompt): 2 x forward (the backward computes input gradients only).
  Trained-weight steps (align, kd): 3 x forward (input and weight gradients). Eval: 1 x forward.
Peak memory: the process's resident set (RSS) at its highest during the step (all models loaded).
"""

from __future__ import annotations

import argparse
import functools
import random
import time

import torch
import torch.nn.functional as F
from benchlib import (
    DTYPES,
    PeakMemory,
    attention_arg,
    common_args,
    machine,
    median,
    print_table,
    resolve,
    synchronize,
    write_json,
)
from peak import measure_peaks
from peft import PrefixTuningConfig, get_peft_model

from fedsp.data.batching import collate, encode_gold, encode_pair
from fedsp.data.tasks import load_task
from fedsp.methods.kd import masked_mse
from fedsp.methods.optim import OptimConfig, Phase
from fedsp.models.adapters import decoder_layers
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.forward import IGNORE, answer_loss, hidden_states, score_choices
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import init_prefix_from_tokens, prefix_for

TRAIN_KINDS = ("server", "align", "prompt", "kd")


class Setup:
    """Models, prefixes, optimisers and batches of one dtype: ours and the plain PEFT twins."""

    def __init__(self, args: argparse.Namespace, dtype: str) -> None:
        loaded = load_global_model(args.model, dtype, device=args.device, attention=args.attention)
        self.model, self.tokenizer, self.pad = loaded.model, loaded.tokenizer, loaded.tokenizer.pad_token_id
        self.device = self.model.device
        P = args.prefix_len
        rows = [encode_gold(self.tokenizer, ex, 256) for ex in load_task(args.task, "train")]
        self.fixed_width = max(len(r.ids) for r in rows)  # the plain path pads every row to this
        rng = random.Random(0)
        self.batches = [collate(rng.sample(rows, args.batch_size), self.pad) for _ in range(args.reps + 1)]
        # ours: prefix initialised from real tokens, one auxiliary model (layer 0 shared over depth)
        self.prefix = prefix_for(self.model, P)
        init_prefix_from_tokens(
            self.prefix, self.model, torch.tensor([t for r in rows[:20] for t in r.ids][:P])
        )
        self.aux = build_auxiliary_model(self.model, [0])
        # ours: the package's optimisation phases (AdamW, clipping; float32 masters of bfloat16 weights)
        self.opt_prefix = Phase(list(self.prefix.parameters()), OptimConfig(lr=1e-3), 1000)
        self.opt_aux = Phase(list(self.aux.parameters()), OptimConfig(lr=1e-4), 1000)
        # plain: PEFT prefix tuning on the global model and on its own auxiliary model
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        self.peft_global = get_peft_model(self.model, config)
        self.peft_aux = get_peft_model(build_auxiliary_model(self.model, [0]), config)
        self.aux_plain = self.peft_aux.get_base_model()
        self.opt_peft_global = torch.optim.AdamW(_prefix_params(self.peft_global), lr=1e-3)
        self.opt_peft_aux_prefix = torch.optim.AdamW(_prefix_params(self.peft_aux), lr=1e-3)
        self.opt_peft_aux = torch.optim.AdamW(self.aux_plain.parameters(), lr=1e-4)
        self.student_plain = build_auxiliary_model(self.model, [0])
        self.opt_student_plain = torch.optim.AdamW(self.student_plain.parameters(), lr=1e-4)
        self.teacher_states = {}  # ours: teacher states per batch, computed once (as methods/kd.py does)
        # evaluation: chunks of questions, contexts and choices tokenised as the evaluator does
        examples = load_task(args.task, "validation")
        q = args.eval_questions
        self.eval_chunks = [examples[i * q : (i + 1) * q] for i in range(args.reps + 1)]
        self.eval_width = max(
            len(encode_pair(self.tokenizer, ex.context, " " + c, 256).ids)
            for chunk in self.eval_chunks
            for ex in chunk
            for c in ex.choices
        )
        self.n_mm = sum(p.numel() for p in decoder_layers(self.model).parameters() if p.dim() == 2)
        cfg = self.model.config
        self.geometry = (
            cfg.num_hidden_layers,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.hidden_size,
            cfg.vocab_size,
            P,
        )


def _prefix_params(peft_model) -> list[torch.nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if "prompt_encoder" in n]


def _fixed(batch: dict[str, torch.Tensor], width: int, pad: int) -> dict[str, torch.Tensor]:
    """Right-pad every tensor of ``batch`` to ``width`` columns (the plain path's fixed padding)."""
    extra = width - batch["input_ids"].shape[1]
    fill = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE}
    return {k: F.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _step(loss: torch.Tensor, params, optimizer) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_mode(s: Setup, kind: str) -> None:
    """requires_grad as the kind needs it, for both paths."""
    trained_aux = kind in ("align", "kd")
    for p in (*s.aux.parameters(), *s.aux_plain.parameters(), *s.student_plain.parameters()):
        p.requires_grad_(trained_aux)
    for p in (*s.prefix.parameters(), *_prefix_params(s.peft_global), *_prefix_params(s.peft_aux)):
        p.requires_grad_(kind in ("server", "prompt"))


def run_ours(s: Setup, kind: str, i: int, bucket: bool) -> None:
    batch = s.batches[i]
    if kind == "server":
        s.opt_prefix.step(answer_loss(s.model, batch, s.prefix, bucket=bucket))
    elif kind == "align":
        s.opt_aux.step(answer_loss(s.aux, batch, s.prefix, bucket=bucket))
    elif kind == "prompt":
        s.opt_prefix.step(answer_loss(s.aux, batch, s.prefix, bucket=bucket))
    elif kind == "kd":
        target = s.teacher_states[i]  # (B, T, H) computed before timing: the cache's steady state
        student = hidden_states(s.aux, batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].to(s.device)
        s.opt_aux.step(masked_mse(student, target, mask))
    elif kind == "eval":
        _eval_ours(s, i, cached=bucket)


@torch.inference_mode()
def _eval_ours(s: Setup, i: int, cached: bool) -> None:
    from fedsp.evaluation.multiple_choice import evaluate_multiple_choice

    s.prefix.eval()
    if cached:
        contexts, choices = _eval_tokens(s, i)
        score_choices(s.model, contexts, choices, s.pad, s.prefix)
    else:
        evaluate_multiple_choice(
            s.model, s.tokenizer, s.eval_chunks[i], s.prefix, 32, progress=False, cached=False
        )
    s.prefix.train()


def _eval_tokens(s: Setup, i: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    contexts, choices = [], []
    for ex in s.eval_chunks[i]:
        encoded = [encode_pair(s.tokenizer, ex.context, " " + c, 256) for c in ex.choices]
        choices.append([list(e.ids[len(e.ids) - e.num_answer :]) for e in encoded])
        contexts.append(list(encoded[0].ids[: len(encoded[0].ids) - encoded[0].num_answer]))
    return contexts, choices


def run_plain(s: Setup, kind: str, i: int) -> None:
    batch = _to(_fixed(s.batches[i], s.fixed_width, s.pad), s.device)
    if kind == "server":
        loss = s.peft_global(**batch).loss  # full logits (B, T, V), shifted cross-entropy inside
        _step(loss, _prefix_params(s.peft_global), s.opt_peft_global)
    elif kind == "align":
        _step(s.peft_aux(**batch).loss, list(s.aux_plain.parameters()), s.opt_peft_aux)
    elif kind == "prompt":
        _step(s.peft_aux(**batch).loss, _prefix_params(s.peft_aux), s.opt_peft_aux_prefix)
    elif kind == "kd":
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad(), s.peft_global.disable_adapter():
            target = s.model(**inputs, output_hidden_states=True).hidden_states[-1].float()  # (B, T, H)
        student = s.student_plain(**inputs, output_hidden_states=True).hidden_states[-1]
        _step(
            masked_mse(student, target, batch["attention_mask"]),
            list(s.student_plain.parameters()),
            s.opt_student_plain,
        )
    elif kind == "eval":
        _eval_plain(s, i)


@torch.inference_mode()
def _eval_plain(s: Setup, i: int) -> None:
    """Every context + choice sequence in full through the PEFT model, full logits, fixed padding."""
    s.peft_global.eval()
    encoded = [
        encode_pair(s.tokenizer, ex.context, " " + c, 256) for ex in s.eval_chunks[i] for c in ex.choices
    ]
    batch = _to(_fixed(collate(encoded, s.pad), s.eval_width, s.pad), s.device)
    logits = s.peft_global(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)  # (N, T-1, V)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    (picked * keep).sum(-1).tolist()
    s.peft_global.train()


def step_work(s: Setup, kind: str, i: int) -> tuple[int, float]:
    """(real tokens, FLOPs) of step ``i`` of ``kind`` under the FLOP model of the module docstring."""
    L, d_q, H, V, P = s.geometry

    def forward(segments: list[tuple[int, int, int]], prefix: int) -> float:
        # segment = (tokens before it in the row, its tokens, its logit rows)
        flops = 0.0
        for before, n, logit_rows in segments:
            keys = n * (prefix + before) + n * (n + 1) / 2  # keys attended, summed over the n tokens
            flops += 2 * s.n_mm * n + 4 * L * d_q * keys + 2 * H * V * logit_rows
        return flops

    if kind == "eval":
        contexts, choices = _eval_tokens(s, i)
        segments = [(0, len(c), 0) for c in contexts]
        segments += [
            (len(c), len(ch), len(ch)) for c, opts in zip(contexts, choices, strict=True) for ch in opts
        ]
        return sum(n for _, n, _ in segments), forward(segments, P)
    batch = s.batches[i]
    lengths = batch["attention_mask"].sum(-1).tolist()
    answers = (batch["labels"] != IGNORE).sum(-1).tolist()
    if kind == "kd":
        return sum(lengths), 3 * forward([(0, n, 0) for n in lengths], 0)
    fwd = forward([(0, n, a) for n, a in zip(lengths, answers, strict=True)], P)
    return sum(lengths), (3 if kind == "align" else 2) * fwd


def prepare_kd(s: Setup) -> None:
    with torch.no_grad():
        for i, batch in enumerate(s.batches):
            s.teacher_states[i] = hidden_states(s.model, batch["input_ids"], batch["attention_mask"]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--kinds", nargs="+", default=["server", "align", "prompt", "kd", "eval"])
    parser.add_argument("--paths", nargs="+", default=["ours", "nobucket", "plain"])
    parser.add_argument("--batch-size", type=int, default=8, help="training rows per step (run default: 8)")
    parser.add_argument("--eval-questions", type=int, default=8, help="questions per eval step")
    parser.add_argument("--prefix-len", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per kind and path")
    parser.add_argument(
        "--profile", nargs="*", default=[], help="kinds to profile (ours) with torch.profiler"
    )
    attention_arg(parser)
    common_args(parser, "steps")
    args = parser.parse_args()
    device = resolve(args.device)
    peaks = measure_peaks(device, (512, 1024, 2048), repeats=5)
    results, profiles = [], {}
    for dtype in args.dtypes:
        s = Setup(args, dtype)
        prepare_kd(s)
        times = measure(s, args, device, dtype)
        for kind in args.profile:
            profiles[f"{dtype}/{kind}"] = _profile(s, kind, device)
        results += [
            summarise(s, dtype, kind, path, times, args) for kind in args.kinds for path in args.paths
        ]
        del s
    later = measure_peaks(device, (512, 1024, 2048), repeats=5)  # the load may have changed: keep the best
    peaks = {
        name: {
            "start": peaks[name],
            "end": later[name],
            "peak": max(peaks[name]["peak"], later[name]["peak"]),
        }
        for name in peaks
    }
    for r in results:
        r["fraction_of_peak"] = r["gflops_best"] / peaks[r["dtype"]]["peak"]
        r["fraction_of_fp32_peak"] = r["gflops_best"] / peaks["float32"]["peak"]
    print_table(
        [
            "dtype",
            "kind",
            "path",
            "s/step best",
            "s/step median",
            "tokens/s",
            "GFLOP/s",
            "% peak",
            "ours x faster",
            "peak RSS MB",
        ],
        [
            [
                r["dtype"],
                r["kind"],
                r["path"],
                r["seconds_best"],
                r["seconds_median"],
                r["tokens_per_s"],
                r["gflops_best"],
                100 * r["fraction_of_peak"],
                r["speedup_of_ours"],
                r["peak_rss_mb"],
            ]
            for r in results
        ],
    )
    print("peak GFLOP/s: " + ", ".join(f"{name} {v['peak']:.0f}" for name, v in peaks.items()))
    for name, table in profiles.items():
        print(f"\nprofile {name} (ours, one step; top operators by self CPU time)\n{table}")
    write_json(
        args.out,
        {
            "machine": machine(device),
            "peaks_gflops": peaks,
            "args": vars(args),
            "rows": results,
            "profiles": profiles,
        },
    )


def summarise(s: Setup, dtype: str, kind: str, path: str, times: dict, args: argparse.Namespace) -> dict:
    """One table row. Best and median over the repetitions; the speed-up is the median of the per-repetition
    ratios (same batch, measured back to back), which a load spike on a shared machine disturbs least."""
    work = [step_work(s, kind, rep) for rep in range(1, args.reps + 1)]  # (tokens, FLOPs) per repetition
    runs = [t[0] for t in times[(kind, path)]]
    ours = [t[0] for t in times.get((kind, "ours"), [])] or runs
    best = min(range(len(runs)), key=runs.__getitem__)
    return {
        "dtype": dtype,
        "kind": kind,
        "path": path,
        "seconds_per_rep": runs,
        "seconds_best": runs[best],
        "seconds_median": median(runs),
        "tokens": work[best][0],
        "tokens_per_s": work[best][0] / runs[best],
        "gflop_per_step": work[best][1] / 1e9,
        "gflops_best": work[best][1] / runs[best] / 1e9,
        "gflops_median": median([w[1] / t for w, t in zip(work, runs, strict=True)]) / 1e9,
        "speedup_of_ours": median([t / o for t, o in zip(runs, ours, strict=True)]),
        "peak_rss_mb": max(t[1] for t in times[(kind, path)]),
        "step_rss_growth_mb": max(t[2] for t in times[(kind, path)]),
    }


def measure(s: Setup, args: argparse.Namespace, device: torch.device, dtype: str) -> dict:
    """Per (kind, path): (seconds, peak RSS MB, RSS growth MB) of each timed repetition, alternating paths."""
    times: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for rep in range(args.reps + 1):  # repetition 0 is the warm-up, not recorded
        for kind in args.kinds:
            _train_mode(s, kind)
            shift = rep % len(args.paths)
            for path in args.paths[shift:] + args.paths[:shift]:  # rotate which path goes first
                if path == "plain":
                    call = functools.partial(run_plain, s, kind, rep)
                else:
                    call = functools.partial(run_ours, s, kind, rep, bucket=path == "ours")
                with PeakMemory(device) as memory:
                    before = memory.peak_rss
                    seconds = _timed(call, device)
                if rep:
                    times.setdefault((kind, path), []).append(
                        (seconds, memory.peak_rss, memory.peak_rss - before)
                    )
                print(f"{dtype} rep {rep} {kind:6s} {path:8s} {seconds:6.2f} s", flush=True)
    return times


def _timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _profile(s: Setup, kind: str, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile

    _train_mode(s, kind)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_ours(s, kind, 1, bucket=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


if __name__ == "__main__":
    main()
