"""``crossling``: the command's entry point. ``crossling study`` runs the study runner; every other
subcommand (``fit``, ``subnetworks``, ``analyze``, ...) goes to the LightningCLI in ``cli.py``. A
user's mistake (a bad file, a missing checkpoint) ends in one line on stderr and exit status 2.

It sits on top of both, so that the study runner can drive the CLI without the CLI knowing the study.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings

from .heap import bound_heap_growth

# Only the standard library at the top: ``crossling --help`` must answer without importing torch and
# Lightning (several seconds); each command imports what it needs when it runs.

COMMANDS = {
    "study": "run the whole study from one config, resumable stage by stage (--list: the plan)",
    "fit": "fine-tune fully, or sparsely with --model.subnetworks DIR; a checkpoint per epoch",
    "subnetworks": "find each language's subnetwork by head-importance pruning of a checkpoint",
    "analyze": "TracIn of a run: --stages [sketch, influence, fidelity, report, counterfactual]",
    "report": "rebuild a study's front page and summary from its files (--config or the root)",
    "validate": "a checkpoint's accuracy per language on dev (--ckpt_path)",
    "test": "a checkpoint's accuracy per language on test (--ckpt_path)",
    "predict": "Lightning's prediction loop, which the sketch stage runs for you",
}


def print_commands() -> None:
    width = max(map(len, COMMANDS))
    print("usage: crossling <command> [options]    (crossling <command> --help: that command's options)\n")
    print("commands:")
    for name, what in COMMANDS.items():
        print(f"  {name:<{width}}  {what}")
    print("\ndocs/study.md, \"The pipeline\", says what each stage reads and writes.")


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a user's mistake (one line, exit 2), imported only when a command ran."""
    from analysis.atomic import DiskFullError
    from analysis.counterfactual import CounterfactualError
    from analysis.influence import InfluenceError
    from analysis.masks import MaskError
    from analysis.projection_error import ProjectionErrorFileError
    from analysis.sketch_store import SketchError
    from callbacks.checkpoints import CheckpointError
    from callbacks.fidelity_sample import FidelityError
    from datamodules import DataError

    from .e5_file import E5FileError
    from .precision import PrecisionError
    from .study import StudyConfigError

    return (
        DataError, CheckpointError, MaskError, SketchError, InfluenceError, FidelityError, ProjectionErrorFileError,
        FileNotFoundError, E5FileError, CounterfactualError, DiskFullError, PrecisionError,
        StudyConfigError,
    )


def _stop_on_sigterm(signum, frame) -> None:
    # Lightning only notes a SIGTERM and carries on; a user's kill should stop the command.
    # Every stage writes atomically, so re-running the same command resumes where it stopped.
    print("crossling: stopped by SIGTERM; run the same command again to resume", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


QUIET = [
    # known, harmless library notices that would bury crossling's own progress lines
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*custom batch sampler.*for prediction.*",
    ".*Experiment logs directory .* exists and is not empty.*",
]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if not args or args[0] in ("-h", "--help"):
        print_commands()
        return
    bound_heap_growth()
    try:
        if args[0] == "study":
            from .study import study_main  # imported on demand: most commands never need it

            study_main(args[1:])
        elif args[0] == "report":
            from .study import report_main

            report_main(args[1:])
        elif args[0] == "pretrain":
            raise SystemExit(
                "crossling pretrain was retired: the tiny encoder it trained learned neither task; "
                "study e5-small (the demo) or a hub encoder such as xlm-roberta-base"
            )
        elif args[0] not in COMMANDS and not args[0].startswith("-"):
            print(f"crossling: error: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
            raise SystemExit(2)
        else:
            from .cli import run_cli

            run_cli(argv)
    except Exception as err:
        # jsonargparse wraps errors raised while building classes: look down the chain
        user_errors = _user_errors()
        found, seen = err, set()
        while found is not None and not isinstance(found, user_errors) and id(found) not in seen:
            seen.add(id(found))
            found = found.__cause__ or found.__context__
        if not isinstance(found, user_errors):
            raise
        print(f"crossling: error: {found}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
