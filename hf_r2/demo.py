"""`hf-r2 demo` (`make demo`): the main job, the short version of `hf-r2 reproduce`.

It trains a stock timm CNN from scratch on CIFAR-10 (the local copy, else `uoft-cs/cifar10`) twice with
[`R2Trainer`], alike but for the R2 term: once without R2 (the baseline: ordinary weight decay only) and once with
R2-Loss (L-inf on each output channel by default). It then measures both models in float and at low bit width,
side by side:

- FP top-1, and W8A8 / W4A8 PTQ (per channel, MSE range) for the accuracy-versus-bits curve;
- W2A8 PTQ per tensor and per channel with the naive (max-abs) and the MSE-optimal range, and 2-bit k-means
  clustering; every row keeps the first and last layer at 8 bits and re-estimates batch-norm statistics;

and prints the table (also `results.md`, `results.json`) and the paths of the plots (weight histograms, per-layer
ranges, accuracy against bits). It is [`hf_r2.reproduce.run_reproduce`] on [`demo_config`], so it is resumable
and its outputs have the layout of `hf-r2 reproduce` (see `configs/reproduce.yaml` for the full experiment).

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

```bash
hf-r2 demo                                    # about 4 minutes on 2 CPU cores
hf-r2 demo --epochs 30 --max-train-samples 0  # the whole training set, for users with more time
```
"""

from __future__ import annotations

import os
from typing import Any, Callable

__all__ = ["DEMO_DEFAULTS", "demo_config", "run_demo", "format_demo", "main"]

#: Defaults of [`run_demo`] and of `hf-r2 demo`'s flags (sized to finish in under 5 minutes on 2 CPU cores).
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": os.path.join("outputs", "demo"),
    "model": "resnet10t",
    "dataset": "cifar10",
    "input_size": 32,
    "epochs": 5.0,
    "max_train_samples": 10000,
    "max_eval_samples": 2000,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "r2_loss": "linf",
    "r2_weight": 3.0,
    "r2_per_channel": True,
    "bits": 2,
    "bn_samples": 512,
    "seed": 0,
}


def demo_config(**overrides: Any):
    """The [`~hf_r2.reproduce.ReproduceConfig`] of the demo: [`DEMO_DEFAULTS`] updated with `overrides`.

    One model, two variants (`baseline`, and `r2_loss` at `r2_weight`), one seed, no lambda sweep; the low-bit rows
    are FP, W8A8 and W4A8 (per channel, MSE), then at `bits` bits: per tensor and per channel with max-abs and MSE
    ranges, and k-means. `bn_samples` training images calibrate the activations and re-estimate batch norm.
    """
    from .reproduce import ReproduceConfig

    unknown = sorted(set(overrides) - set(DEMO_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown demo setting(s) {unknown}; the settings are {sorted(DEMO_DEFAULTS)}.")
    s = {**DEMO_DEFAULTS, **overrides}
    bits = s["bits"]
    low_bit: list[dict[str, Any]] = [
        {"method": "ptq", "w_bits": w, "a_bits": 8, "per_channel": True, "weight_range": "mse"} for w in (8, 4)
        if w > bits
    ]
    low_bit += [
        {"method": "ptq", "w_bits": bits, "a_bits": 8, "per_channel": per_channel, "weight_range": weight_range}
        for per_channel in (False, True)
        for weight_range in ("maxabs", "mse")
    ]
    low_bit.append({"method": "kmeans", "w_bits": bits})
    return ReproduceConfig(
        output_dir=s["output_dir"],
        dataset=s["dataset"],
        input_size=s["input_size"],
        max_train_samples=s["max_train_samples"],
        max_eval_samples=s["max_eval_samples"],
        data_seed=s["seed"],
        models=[s["model"]],
        variants=[
            {"name": "baseline", "loss": "baseline"},
            {"name": s["r2_loss"], "loss": s["r2_loss"], "weight": s["r2_weight"], "per_channel": s["r2_per_channel"]},
        ],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["learning_rate"],
        weight_decay=s["weight_decay"],
        seeds=[s["seed"]],
        lambda_sweep=None,
        low_bit=low_bit,
        calibration_samples=s["bn_samples"],
    )


def run_demo(
    *,
    progress: bool = True,
    print_fn: Callable[[str], Any] | None = print,
    **settings: Any,
) -> dict[str, Any]:
    """Train the baseline and the R2 model, measure FP and low-bit top-1 of both, print the table and plot paths.

    Args:
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
        print_fn (`Callable[[str], Any]`, *optional*, defaults to `print`):
            Where the report goes; `None` prints nothing.
        settings:
            Any of [`DEMO_DEFAULTS`]: `output_dir`, `model` (timm name, trained from scratch), `dataset`,
            `input_size`, `epochs`, `max_train_samples` / `max_eval_samples` (`None`: the whole split),
            `batch_size`, `learning_rate` (AdamW, cosine), `weight_decay` (both runs), `r2_loss`, `r2_weight`
            (lambda; large next to the paper's because AdamW normalises each weight's step), `r2_per_channel`,
            `bits` (the low-bit rows' weight bits), `bn_samples` (calibration / BN images), `seed`.

    Returns:
        `dict`: the [`~hf_r2.reproduce.run_reproduce`] result, as written to `output_dir/results.json`.
    """
    from .reproduce import RESULTS_NAME, run_reproduce

    config = demo_config(**settings)
    results = run_reproduce(config, progress=progress, print_fn=None)
    if print_fn:
        print_fn(format_demo(results))
        print_fn(f"\nTable: {os.path.join(results['output_dir'], 'results.md')}; numbers: "
                 f"{os.path.join(results['output_dir'], RESULTS_NAME)}; trained models: "
                 f"{os.path.join(results['output_dir'], 'runs')}")
    return results


def format_demo(results: dict[str, Any]) -> str:
    """The demo's report: the table of `results.md` for its one model, the time, and the plots' paths."""
    from .reproduce import format_report

    report = format_report(results)
    table = [line for line in report.splitlines() if not line.startswith("![")]
    plots = [path for model in results.get("plots", {}).values() for path in model.values()]
    return "\n".join([*table, "Plots:", *(f"  {path}" for path in plots)])


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_r2.demo [flags]`: the same as `hf-r2 demo [flags]`."""
    from .cli import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
