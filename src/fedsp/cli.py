"""Command line: ``fedsp run [options]``; ``fedsp eval|generate|export RUN`` on a finished run.

Precedence: built-in defaults < ``--config FILE`` < options given on the
command line. Input errors print one line (``fedsp: error: ...``) and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedsp.config import OPTIONS, SECTIONS, RunConfig, load_config_file
from fedsp.data.tasks import TASKS
from fedsp.errors import FedSPError, RunFinished, RunInterrupted, cli_wording
from fedsp.evaluation import METRIC_COLUMNS
from fedsp.files import io_reason
from fedsp.methods.fidelity import FIDELITY, describe_fidelity
from fedsp.methods.table import spec_for

MAX_LINE = 500  # an error line's length at most


def option_help() -> dict[str, str]:
    """Each ``fedsp run`` option's help text, from its :class:`RunConfig` field (``metadata["help"]``)."""
    texts = {f.name: f.metadata["help"] for f in dataclasses.fields(RunConfig) if "help" in f.metadata}
    texts["task"] = texts["task"].replace("{tasks}", ", ".join(TASKS))
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsp", description="Federated fine-tuning of a private LLM with soft prompts (FedSP)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a federated course and write a results folder",
        description="Run a FedSP course. With no options: SmolLM2-135M on ARC-Easy, 10 clients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--config", help="TOML or YAML file of the same keys (options on the command line win)")
    defaults = RunConfig()
    texts = option_help()
    for title, names in SECTIONS.items():
        group = run.add_argument_group(f"{title} options")
        for name in (n for n in names if n in texts):
            group.add_argument(
                "--" + name.replace("_", "-"),
                default=argparse.SUPPRESS,
                help=f"{texts[name]} (default: {getattr(defaults, name)})",
            )
    run.add_argument("--quiet", action="store_true", help="no progress bars: one line a round")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="also other libraries' warnings and progress bars (Flower's, transformers')",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in results folder DIR after its last "
        "completed round (its config.json is the configuration; options given must agree)",
    )
    from fedsp.experiments import compare
    from fedsp.runtime import commands

    compare.add_parser(sub)
    commands.add_parsers(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = config_file_values(args.config) if args.config else {}
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise FedSPError(f"--resume {args.resume!r} is not a results folder (no config.json there)")
        # written by this or another version: unknown keys dropped (one warning), missing ones defaulted
        written = RunConfig.from_dict(load_config_file(saved), strict=False, source=str(saved))
        values = {**written.to_dict(), **values}
    names = option_help()
    given = RunConfig.coerce({k: v for k, v in vars(args).items() if k in names}, source=OPTIONS)
    for spec in dataclasses.fields(RunConfig):  # --eval-limit 0: all, on the command line and in a file
        if spec.metadata.get("zero_unsets") and given.get(spec.name, values.get(spec.name)) == 0:
            given[spec.name] = None
    config = RunConfig(**{**values, **given})
    if args.quiet:
        config = dataclasses.replace(config, progress=False)
    return config


def config_file_values(path: str) -> dict[str, Any]:
    """A ``--config`` file's keys as RunConfig values; a relative ``data_dir`` read from the file's folder
    (a configuration names its data where it lies, wherever the command is started)."""
    values = RunConfig.coerce(load_config_file(path), source=f"config file {path!r}")
    data_dir = values.get("data_dir")
    if data_dir is not None and not Path(data_dir).expanduser().is_absolute():
        values["data_dir"] = str(Path(path).parent / data_dir)
    return values


def main(argv: Sequence[str] | None = None) -> int:
    with cli_wording():  # errors name options as flags here (from Python: as RunConfig fields)
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives an optional positional (generate's prompt) nothing once an option follows the run
    # folder: `fedsp generate RUN --no-prefix "text"` leaves "text" over; it is the prompt
    if args.command == "generate" and args.prompt is None and len(extra) == 1:
        if not extra[0].startswith("-"):
            args.prompt, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "compare":
            from fedsp.experiments.compare import run_compare

            with terminate_as_interrupt(), third_party_output(False):
                return run_compare(args)
        if args.command in ("eval", "generate", "export"):
            from fedsp.runtime.commands import COMMANDS

            with third_party_output(False):
                return COMMANDS[args.command](args)
        config = config_from_args(args)
        resume = Path(args.resume) if getattr(args, "resume", None) else None
        with quiet_lines(args.quiet), terminate_as_interrupt(), third_party_output(args.verbose):
            if config.engine == "flower":
                from fedsp.runtime.flower import simulation

                outcome = simulation.run(config, resume=resume)
            else:
                from fedsp.runtime import inprocess

                outcome = inprocess.run(config, resume=resume)
    except RunFinished as done:
        print(f"fedsp: {done}", file=sys.stderr)
        return 0
    except FedSPError as err:
        print(f"fedsp: error: {error_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions... (a run says what it kept: fedsp.runtime.results)
        where = f"{err.filename}: " if err.filename else ""
        print(f"fedsp: error: {error_line(where + io_reason(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"fedsp: {interrupted(err, args.command)}", file=sys.stderr)
        return 143 if _terminated(err) else 130
    print(format_summary(outcome.results, str(outcome.out_dir)))
    return 0


def error_line(err: object) -> str:
    """An error as one line of at most :data:`MAX_LINE` characters (a path or a value built from a file can
    be as long as the file)."""
    line = " ".join(str(err).split())
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


class _Drop(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


THIRD_PARTY = ("transformers", "peft", "flwr", "torch", "ray", "huggingface_hub")


@contextlib.contextmanager
def third_party_output(verbose: bool) -> Iterator[None]:
    """Other libraries' notices, warnings and progress bars are not fedsp's: silenced unless ``--verbose``
    (Flower's run_simulation deprecation notice, transformers' "Loading weights" and "Writing model
    shards" bars, their FutureWarnings). fedsp's own notes, warnings and Flower's errors still show."""
    if verbose:
        yield
        return
    import warnings

    from transformers.utils import logging as hf_logging

    flwr = logging.getLogger("flwr")
    deprecated = _Drop("DEPRECATED FEATURE")
    flwr.addFilter(deprecated)
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            for module in THIRD_PARTY:
                warnings.filterwarnings("ignore", module=module)
            yield
    finally:
        flwr.removeFilter(deprecated)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C: the round in progress is dropped, completed rounds are kept."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While a run goes on, SIGTERM (``kill``, a scheduler's stop) ends it as Ctrl-C does: the completed
    rounds are kept and the resume command is printed (exit status 143)."""

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _terminated(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, Terminated):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def quiet_lines(quiet: bool) -> Iterator[None]:
    """``--quiet``: no progress bars, but one line a round still."""
    from fedsp.runtime.session import ROUND_LINES

    before, ROUND_LINES.on = ROUND_LINES.on, quiet
    try:
        yield
    finally:
        ROUND_LINES.on = before


def interrupted(err: KeyboardInterrupt, command: str) -> str:
    """What Ctrl-C left: a run's completed rounds and how to continue them, or nothing."""
    if command == "compare":  # a cell interrupted after a round continues from it
        return "interrupted; the same fedsp compare continues the unfinished cells"
    how = "stopped (SIGTERM)" if _terminated(err) else "interrupted"
    if not isinstance(err, RunInterrupted):
        return how
    if err.folder is None:  # a folder this run made is kept only once a round completed
        return f"{how} before the first round completed; nothing was kept"
    return f"{how} after round {err.completed}; fedsp run --resume {err.folder} continues"


def format_summary(res: dict, out_dir: str) -> str:
    fin = res["final"]
    columns = [(k, label) for k, label in METRIC_COLUMNS.items() if k in fin]
    lines = [
        "",
        f"{res['method']} on {res['task']} ({res['model']}), {fin['n']} {res['eval_split']} examples:",
        f"  {'':<28}" + "".join(f"{label:>10}" for _, label in columns),
    ]

    def cells(figures: dict) -> str:
        return "".join(f"{100 * figures[k]:>10.1f}" for k, _ in columns)

    if res.get("zero_shot") and spec_for(res["method"]).trains:
        lines.append(f"  {'zero-shot':<28}" + cells(res["zero_shot"]))
    label = res["method"] + (f" (best round {res['best_round']})" if res.get("rounds") else "")
    lines.append(f"  {label:<28}" + cells(fin))
    if res.get("emulator"):  # the same prompt or adapter on the clients' own model
        lines.append(f"  {'  emulator (clients model)':<28}" + cells(res["emulator"]))
    client = res.get("client_model")
    if client:
        privacy = "" if client["model_private"] else "; the whole global model: no model privacy"
        if client.get("privacy"):
            privacy = "; model privacy " + client["privacy"].split(":")[0]
        lines.append(
            f"  client model: {client['params'] / 1e6:.1f} M params "
            f"({100 * client['fraction_of_global']:.1f}% of the global model{privacy})"
        )
    gains = res.get("contributions")
    if gains:
        lines.append(
            f"  validation loss lowered by the clients' aggregate {gains['clients_gain_total']:+.4f} "
            f"(in {gains['rounds_clients_lowered_loss']} of {gains['rounds']} rounds), by the server's "
            f"own steps {gains['server_gain_total']:+.4f}"
        )
    fidelity = res.get(FIDELITY)
    if fidelity:
        lines.append(f"  {describe_fidelity(fidelity)}")
    comm = res.get("comm")
    if comm:
        lines.append(
            f"  per client and round: {comm['params_down_per_round']:,} params down / "
            f"{comm['params_up_per_round']:,} up ({comm['bytes_down_per_round'] / 1e6:.2f} MB each way)"
        )
    dp: dict[str, Any] = res.get("privacy") or {}
    if dp:
        stopped = (
            f"; stopped before round {dp['stopped_before_round']} (budget)"
            if "stopped_before_round" in dp
            else ""
        )
        lines.append(
            f"  client-level DP: epsilon {dp['epsilon']:.3g} at delta {dp['delta']:g} "
            f"(noise multiplier {dp['noise_multiplier']:.3g}, clip {dp['clip']:g}){stopped}"
        )
    protection: dict[str, Any] = res.get("protection") or {}
    if protection.get("aggregation", "mean") != "mean" or protection.get("secure_aggregation"):
        secure = ", secure aggregation (SecAgg+)" if protection.get("secure_aggregation") else ""
        lines.append(f"  aggregation: {protection['aggregation']}{secure}")
    if protection.get("attack"):
        attackers = ",".join(map(str, protection["attackers"]))
        lines.append(f"  SIMULATED ATTACK: partitions {attackers} sent {protection['attack']}")
    exported = res.get("export") or {}
    if exported.get("prefix") and exported.get("adapter"):
        lines.append(
            f"  best prefix: {out_dir}/{exported['prefix']}; PEFT adapter: {out_dir}/{exported['adapter']}"
        )
    elif exported.get("layers"):  # a method that tunes the global model's own layers
        lines.append(f"  tuned layers (best round): {out_dir}/{exported['layers']}")
    elif exported.get("adapter"):
        lines.append(f"  tuned layers (best round), as a PEFT LoRA adapter: {out_dir}/{exported['adapter']}")
    if res.get("ignored_options"):
        lines.append(f"  ignored options: {res['ignored_options']}")
    lines.append(f"  wall time {res['wall_seconds']:.0f} s; results in {out_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
