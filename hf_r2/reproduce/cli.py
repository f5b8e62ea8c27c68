"""The `hf-r2 reproduce CONFIG.yaml` sub-command (also `python -m hf_r2.reproduce CONFIG.yaml`)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import REPORT_NAME, RESULTS_NAME, ReproduceConfig
from .pipeline import run_reproduce

__all__ = ["reproduce_command_parser", "reproduce_command"]


def reproduce_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `reproduce` sub-command: `hf-r2 reproduce CONFIG.yaml [--output-dir DIR] [--no-progress]`."""
    description = (
        "Reproduce the paper's claim side by side: train baseline and R2 variants alike (models x variants x seeds, "
        "plus a lambda sweep), measure FP and every low-bit row on each, and write results.json, results.md and "
        "plots. Resumable: rerun the same command to continue."
    )
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 reproduce", description=description)
    else:
        parser = subparsers.add_parser("reproduce", description=description, help="Baseline vs R2, end to end.")
    parser.add_argument("config", help="A YAML or JSON file of ReproduceConfig fields (see configs/reproduce.yaml).")
    parser.add_argument("--output-dir", "--output_dir", default=None, help="Override the config's output_dir.")
    parser.add_argument("--data-dir", "--data_dir", default=None, help="Override the config's data_dir.")
    parser.add_argument("--models", nargs="+", default=None,
                        help="Run only these of the config's models (e.g. one process per model in parallel, into "
                             "the same output_dir; a last run without --models then reuses everything and reports "
                             "all).")
    parser.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                        help="Hide the progress bars.")
    parser.set_defaults(func=reproduce_command)
    return parser


def reproduce_command(args: argparse.Namespace) -> int:
    try:
        config = ReproduceConfig.from_file(args.config)
        overrides = {k: getattr(args, k) for k in ("output_dir", "data_dir") if getattr(args, k, None)}
        if overrides:
            config = ReproduceConfig.from_dict({**config.to_dict(), **overrides})
        if args.models:
            config = config.select_models(args.models)
        results = run_reproduce(config, progress=args.progress)
    except (ValueError, OSError) as err:
        print(f"hf-r2 reproduce: error: {err}", file=sys.stderr)
        return 1
    print(f"\nResults: {os.path.join(results['output_dir'], RESULTS_NAME)} (and {REPORT_NAME}, plots/)")
    return 0
