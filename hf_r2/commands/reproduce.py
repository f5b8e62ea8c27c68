"""`hf-r2 reproduce CONFIG.yaml` (the paper's claim side by side, [`hf_r2.reproduce.run_reproduce`]) and `hf-r2 demo`
(`make demo`), the main job: the short version of `hf-r2 reproduce`.

The demo trains a stock timm CNN from scratch on CIFAR-10 (the local copy, else `uoft-cs/cifar10`) twice with
[`R2Trainer`], alike but for the R2 term: once without R2 (the baseline: ordinary weight decay only) and once with
R2-Loss (L-inf on each output channel by default). It then measures both models in float and at low bit width,
side by side:

- FP top-1, and W8A8 / W4A8 PTQ (per channel, MSE range) for the accuracy-versus-bits curve;
- W2A8 PTQ per tensor and per channel with the naive (max-abs) and the MSE-optimal range, and 2-bit k-means
  clustering; every row keeps the first and last layer at 8 bits and re-estimates batch-norm statistics;

and prints the table (also `results.md`, `results.json`) and the paths of the plots (weight histograms, per-layer
ranges, accuracy against bits). It is [`hf_r2.reproduce.run_reproduce`] on the preset
[`~hf_r2.reproduce.presets.demo_config`], so it is resumable and its outputs have the layout of `hf-r2 reproduce`
(`hf-r2 reproduce paper` is the full experiment; `hf-r2 reproduce --help` lists the presets).

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

```bash
hf-r2 demo                                    # about 4 minutes on 2 CPU cores
hf-r2 demo --epochs 30 --max-train-samples 0  # the whole training set, for users with more time
```
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from typing import Any, Callable, Iterator

__all__ = [
    "reproduce_command_parser",
    "reproduce_command",
    "demo_command_parser",
    "demo_command",
    "run_demo",
    "format_demo",
    "DEMO_THREADS",
]


# ----------------------------------------------------------------------------------------------------------------
# reproduce


def reproduce_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `reproduce` sub-command: `hf-r2 reproduce PRESET|CONFIG.yaml [--output-dir DIR] [--no-progress]`."""
    from ..reproduce.presets import CONFIG_PRESETS

    description = (
        "Reproduce the paper's claim side by side: train baseline and R2 variants alike (models x variants x seeds, "
        "plus a lambda sweep), measure FP and every low-bit row on each, and write results.json, results.md and "
        "plots. Resumable: rerun the same command to continue."
    )
    width = max(map(len, CONFIG_PRESETS)) + 4
    epilog = "presets (shipped with hf-r2; try `hf-r2 reproduce tiny` first):\n" + "\n".join(
        textwrap.fill(f"{name:<{width - 4}}  {about} [{file}]", 79, initial_indent="  ", subsequent_indent=" " * width)
        for name, (file, about) in CONFIG_PRESETS.items())
    kwargs = dict(description=textwrap.fill(description, 79), epilog=epilog,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # the presets' table as written
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 reproduce", **kwargs)
    else:
        parser = subparsers.add_parser("reproduce", help="Baseline vs R2, end to end.", **kwargs)
    parser.add_argument("config", metavar="PRESET|CONFIG",
                        help=f"A preset ({', '.join(CONFIG_PRESETS)}: listed below), or a YAML or JSON file of "
                             "ReproduceConfig fields, or a run's output_dir (its reproduce_config.json). A preset "
                             "name wins over a file of that name: write ./NAME for the file.")
    parser.add_argument("--output-dir", "--output_dir", default=None, help="Override the config's output_dir.")
    parser.add_argument("--data-dir", "--data_dir", default=None, help="Override the config's data_dir.")
    parser.add_argument("--models", nargs="+", default=None,
                        help="Run only these of the config's models (e.g. one process per model in parallel, into "
                             "the same output_dir; a last run without --models then reuses everything and reports "
                             "all).")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="Run only these of the config's variants, with the baseline and the variant each is "
                             "compared to (same cache: a last run without --variants reuses them).")
    parser.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                        help="No progress bars: occasional plain progress lines instead (what a pipe or a log file "
                             "gets anyway).")
    parser.add_argument("--status", action="store_true",
                        help="Print where the run stands, from its cache, and return at once: per training done, "
                             "running (epoch k of n, in another process), interrupted or missing, and the choices "
                             "made so far. Trains and measures nothing.")
    parser.set_defaults(func=reproduce_command)
    return parser


def reproduce_command(args: argparse.Namespace) -> int:
    from ..reproduce import REPORT_NAME, RESULTS_NAME, ReproduceConfig, run_reproduce
    from ..reproduce.presets import load_config

    try:
        config = load_config(args.config)
        overrides = {k: getattr(args, k) for k in ("output_dir", "data_dir") if getattr(args, k, None)}
        if overrides:
            config = ReproduceConfig.from_dict({**config.to_dict(), **overrides})
        if args.models:
            config = config.select_models(args.models)
        if getattr(args, "variants", None):
            config = config.select_variants(args.variants)
        if getattr(args, "status", False):
            from ..reproduce.status import format_status, run_states

            print(format_status(config, run_states(config)))
            return 0
        results = run_reproduce(config, progress=args.progress)
    except (ValueError, OSError) as err:
        print(f"hf-r2 reproduce: error: {err}", file=sys.stderr)
        return 1
    print(f"\nResults: {os.path.join(results['output_dir'], RESULTS_NAME)} (and {REPORT_NAME}, plots/)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# demo


#: The demo's CPU threads (`hf-r2 demo --threads`): the README's table was measured with 2. The numbers are the same
#: on every run with the same thread count; another count sums in another order (the float rounding differs after
#: the first step, and 785 steps later the models differ by a few tenths of a point).
DEMO_THREADS = 2


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (`None` or 0: left as they are), then put back."""
    import torch

    if threads is not None and threads < 0:
        raise ValueError(f"`threads` must be >= 0 (0: one per core), got {threads}.")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    *,
    progress: bool = True,
    print_fn: Callable[[str], Any] | None = print,
    threads: int | None = DEMO_THREADS,
    **settings: Any,
) -> dict[str, Any]:
    """Train the baseline and the R2 model, measure FP and low-bit top-1 of both, print the table and plot paths.

    Args:
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars in a terminal; plain progress lines otherwise.
        print_fn (`Callable[[str], Any]`, *optional*, defaults to `print`):
            Where the report goes; `None` prints nothing.
        threads (`int`, *optional*, defaults to [`DEMO_THREADS`] = 2):
            torch's CPU threads while the demo runs (put back afterwards): the seeded demo gives the same numbers
            on every run with the same thread count, and the README's table was measured with 2. `None` or 0:
            torch's default (one per core), faster on a larger machine, with slightly different numbers.
        settings:
            Any of [`~hf_r2.reproduce.presets.DEMO_DEFAULTS`]: `output_dir`, `model` (timm name, trained from
            scratch), `dataset`,
            `input_size`, `epochs`, `max_train_samples` / `max_eval_samples` (`None`: the whole split),
            `batch_size`, `learning_rate` (AdamW, cosine), `weight_decay` (both runs), `r2_loss`, `r2_weight`
            (lambda; large next to the paper's because AdamW normalises each weight's step), `r2_per_channel`,
            `bits` (the low-bit rows' weight bits), `bn_samples` (calibration / BN images), `seed`.

    Returns:
        `dict`: the [`~hf_r2.reproduce.run_reproduce`] result, as written to `output_dir/results.json`.
    """
    from ..reproduce import RESULTS_NAME, run_reproduce
    from ..reproduce.presets import demo_config

    config = demo_config(**settings)
    with _torch_threads(threads):
        results = run_reproduce(config, progress=progress, print_fn=None)
    if print_fn:
        print_fn(format_demo(results))
        print_fn(f"\nTable: {os.path.join(results['output_dir'], 'results.md')}; numbers: "
                 f"{os.path.join(results['output_dir'], RESULTS_NAME)}; trained models: "
                 f"{os.path.join(results['output_dir'], 'runs')}")
    return results


def format_demo(results: dict[str, Any]) -> str:
    """The demo's report: the table of `results.md` for its one model, the time, and the plots' paths."""
    from ..reproduce import format_report

    report = format_report(results)
    table = [line for line in report.splitlines() if not line.startswith("![")]
    plots = [path for model in results.get("plots", {}).values() for path in model.values()]
    return "\n".join([*table, "Plots:", *(f"  {path}" for path in plots)])


def demo_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `demo` sub-command: baseline vs R2 training on CIFAR-10, then FP and 2-bit results ([`run_demo`])."""
    from ..reproduce.presets import DEMO_DEFAULTS

    description = (
        "The main job, the short version of `hf-r2 reproduce`: train a small timm CNN on CIFAR-10 twice, without "
        "and with R2-Loss, then print FP and low-bit (W8A8, W4A8, W2A8 PTQ, 2-bit k-means) top-1 of both side by "
        "side, and the paths of the plots."
    )
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 demo", description=description)
    else:
        parser = subparsers.add_parser("demo", description=description, help=description)
    d = DEMO_DEFAULTS
    add = parser.add_argument
    add("--output-dir", "--output_dir", default=d["output_dir"], help="Where both runs are saved.")
    add("--model", default=d["model"], help="timm model name, trained from scratch.")
    add("--dataset", default=d["dataset"], help="Dataset name or path (see `hf-r2 train --help`).")
    add("--input-size", "--input_size", type=int, default=d["input_size"], help="Input side in pixels.")
    add("--epochs", type=float, default=d["epochs"], help="Training epochs of each run.")
    add("--max-train-samples", "--max_train_samples", type=int, default=d["max_train_samples"],
        help="Training examples (seeded random subset); 0 or less uses all.")
    add("--max-eval-samples", "--max_eval_samples", type=int, default=d["max_eval_samples"],
        help="Evaluation examples (seeded random subset); 0 or less uses all.")
    add("--batch-size", "--batch_size", type=int, default=d["batch_size"], help="Training batch size.")
    add("--learning-rate", "--learning_rate", type=float, default=d["learning_rate"], help="Peak learning rate.")
    add("--weight-decay", "--weight_decay", type=float, default=d["weight_decay"], help="Weight decay of both runs.")
    add("--r2-loss", "--r2_loss", default=d["r2_loss"], choices=["linf", "margin", "soft_min_max", "kurtosis"],
        help="R2 variant of the R2 run.")
    # dest stays `r2_weight`, the demo's setting (--r2-weight is the flag's older name)
    add("--r2-lambda", "--r2_lambda", "--r2-weight", "--r2_weight", dest="r2_weight", metavar="LAMBDA", type=float,
        default=d["r2_weight"], help="The paper's lambda: coefficient of the R2 term of the R2 run.")
    add("--r2-per-channel", "--r2_per_channel", action=argparse.BooleanOptionalAction, default=d["r2_per_channel"],
        help="Apply R2 per output channel instead of per layer.")
    add("--bits", type=int, default=d["bits"], help="Weight bits of the low-bit rows (W<bits>A8, k-means).")
    add("--bn-samples", "--bn_samples", type=int, default=d["bn_samples"],
        help="Training images that calibrate activations and re-estimate batch norm after quantization.")
    add("--seed", type=int, default=d["seed"], help="Seed of both runs.")
    add("--threads", type=int, default=DEMO_THREADS,
        help="CPU threads of torch. The numbers are the same on every run with the same thread count; the README's "
             "table was measured with 2 (the default). 0: one per core (faster, slightly different numbers).")
    add("--no-progress", "--no_progress", dest="progress", action="store_false",
        help="No progress bars: occasional plain progress lines instead (what a pipe or a log file gets anyway).")
    parser.set_defaults(func=demo_command)
    return parser


def demo_command(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "extra_args", "takes_extra_args")}
    for key in ("max_train_samples", "max_eval_samples"):
        if options[key] is not None and options[key] <= 0:
            options[key] = None
    try:
        run_demo(**options)
    except (ValueError, OSError) as err:
        print(f"hf-r2 demo: error: {err}", file=sys.stderr)
        return 1
    return 0
