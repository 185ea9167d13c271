"""`posttrain` command line: run, validate, and a few helpers. Config errors exit with 2."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from rich.console import Console

VERBS = {
    "run": "run a recipe (a path or a shipped recipe's name) with KEY=VALUE overrides",
    "validate": "check a recipe (types, keys, files) without running anything",
    "recipes": "list the recipes shipped with posttrain",
    "compare": "each stage's held-out change and its z, across run dirs (seeds, variants)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training and RL for hybrid lightning-attention MoE models.",
        epilog="verbs:\n" + "\n".join(f"  {k:<10} {v}" for k, v in VERBS.items())
        + "\n\nexample: posttrain run demo stages.sft.steps=50 cluster.num_cpus=2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb in ("run", "validate"):
        s = sub.add_parser(verb, help=VERBS[verb])
        s.add_argument("recipe", help="recipe file or shipped recipe name (see `posttrain recipes`)")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. stages.0.optim.lr=1e-4")
        if verb == "run":
            s.add_argument("--resume", action="store_true", help="continue the run in the recipe's run_dir")
            s.add_argument("--overwrite", action="store_true", help="delete an existing run_dir and start over")
    sub.add_parser("recipes", help=VERBS["recipes"])
    c = sub.add_parser("compare", help=VERBS["compare"])
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (finished or not)")
    c.add_argument("--png", default="compare.png", help="where to draw the changes (default: compare.png)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags (`run demo --resume a=1`): argparse stops the
    # positional list at the first flag, so the rest arrives here as unknown arguments.
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*getattr(args, "overrides", []), *rest]
    console = Console()
    if args.verb is None:
        _parser().print_help()
        return 0
    if args.verb == "compare":
        return compare(console, args.runs, args.png)
    if args.verb == "recipes":
        from posttrain.config import recipe_path
        from pathlib import Path

        for p in sorted(Path(recipe_path("demo")).parent.glob("*.yaml")):
            console.print(p.stem)
        return 0
    from posttrain.config import ConfigError, load_recipe

    cfg = None
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if args.verb == "validate":
            console.print(f"[green]{args.recipe}: OK[/green] ({len(cfg.stages)} stages: "
                          + ", ".join(f"{s.name} ({s.kind})" for s in cfg.stages) + ")")
            return 0
        from posttrain.cluster import ON_STUCK_STOP, stop_grace_s
        from posttrain.pipeline import run_recipe

        # SIGTERM to the whole process group kills Ray's own processes too, and the shutdown can
        # then hang: the watchdog of posttrain.cluster.stop_on_sigterm prints this and exits
        ON_STUCK_STOP[:] = [lambda why: print_error(console, "stopped", RuntimeError(
            stopped_message(why, cfg) + f" (Ray's processes did not shut down within {stop_grace_s():.0f} s and "
            f"were killed)"))]
        run_recipe(cfg, resume=args.resume, overwrite=args.overwrite, console=console)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (posttrain.cluster.stop_on_sigterm)
        from posttrain.cluster import ON_STUCK_STOP, STOPPED_BY

        ON_STUCK_STOP.clear()  # the line is printed here: a watchdog that fires later prints no second one
        why = STOPPED_BY[0] if STOPPED_BY else "SIGINT"
        print_error(console, "stopped", RuntimeError(stopped_message(why, cfg if args.verb == "run" else None)))
        return 143 if why == "SIGTERM" else 130
    except ConfigError as e:
        print_error(console, "error", e)
        return 2
    except Exception as e:  # noqa: BLE001 - data problems found while reading files
        from posttrain.data import DataError

        if isinstance(e, DataError):
            print_error(console, "data error", e)
            return 2
        from posttrain.cluster import LearnerLost

        if isinstance(e, LearnerLost):  # a process died mid-run: one line, the way back is --resume
            print_error(console, "error", e)
            return 1
        raise
    return 0


def compare(console: Console, runs: list[str], png: str) -> int:
    from pathlib import Path

    from posttrain.compare import CompareError, compare_table, plot_changes, run_labels, stage_changes

    try:
        changes = [stage_changes(Path(r)) for r in runs]
    except CompareError as e:
        print_error(console, "error", e)
        return 2
    labels = run_labels([Path(r) for r in runs])
    console.print(compare_table(labels, changes))
    console.print(f"plot: {plot_changes(labels, changes, Path(png))}", highlight=False)
    return 0


def stopped_message(why: str, cfg: Any) -> str:
    """The closing line's text for a run stopped by signal `why` (cfg None: before any run)."""
    if cfg is None:
        return why
    return f"{why}; {cfg.resolved_run_dir} keeps every saved step: the same command with --resume continues the run"


def print_error(console: Console, label: str, error: Exception) -> None:
    """`label: message` on exactly one line, whatever the terminal width (tests and logs read
    it): never wrapped by the console, newlines inside the message folded, no markup parsed
    from the message (a path or key may contain brackets)."""
    from rich.text import Text

    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    console.print(Text.assemble((f"{label}:", "red"), " ", message), soft_wrap=True, highlight=False)


if __name__ == "__main__":
    sys.exit(main())
