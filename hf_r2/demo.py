"""`hf-r2 demo` (`make demo`): the main job. A real R2 training on the default data, then its low-bit result.

It trains a stock timm CNN from scratch on CIFAR-10 (the local copy, else `uoft-cs/cifar10`) twice with
[`R2Trainer`], through the same code as `hf-r2 train`: once without R2 (`r2_weight=0`, the baseline: ordinary
weight decay only) and once with R2-Loss (L-inf on each output channel by default). It then quantizes both
models' Conv/Linear weights to 2 bits (symmetric, per output channel, round-to-nearest over the full range),
re-estimates the batch-norm statistics on a few hundred training images, and prints for each model

- top-1 accuracy in float, at 2 bits, and at 2 bits after the batch-norm re-estimation;
- the largest absolute weight and the mean over layers of `max|w| / std(w)`;
- the per-layer weight range `[min, max]`.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253).

```bash
hf-r2 demo                                    # about 5 minutes on 2 CPU cores
hf-r2 demo --epochs 30 --max-train-samples 0  # the whole training set, for users with more time
```
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from ._utils import write_json_atomic

__all__ = ["DEMO_DEFAULTS", "run_demo", "format_report", "main"]

#: Defaults of [`run_demo`] and of `hf-r2 demo`'s flags (sized to finish in about 5 minutes on 2 CPU cores).
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


def _loader(dataset, batch_size: int, shuffle: bool = False):
    import torch

    from .data import collate_fn

    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator
    )


def _low_bit_results(model, eval_loader, bn_loader, bits: int) -> dict[str, float]:
    """Float, `bits`-bit and `bits`-bit + BN re-estimation accuracy of `model` (which is left untouched)."""
    from .metrics import evaluate_accuracy
    from .quant import quantize_weights, reestimate_bn_stats

    fp = evaluate_accuracy(model, eval_loader)
    quantized = quantize_weights(model, bits=bits, per_channel=True, symmetric=True)
    low = evaluate_accuracy(quantized, eval_loader)
    reestimate_bn_stats(quantized, bn_loader, num_batches=None)
    low_bn = evaluate_accuracy(quantized, eval_loader)
    return {"fp_accuracy": fp["accuracy"], "fp_loss": fp["loss"], "low_bit_accuracy": low["accuracy"],
            "low_bit_bn_accuracy": low_bn["accuracy"], "low_bit_bn_loss": low_bn["loss"]}


def run_demo(
    output_dir: str = DEMO_DEFAULTS["output_dir"],
    model: str = DEMO_DEFAULTS["model"],
    dataset: str = DEMO_DEFAULTS["dataset"],
    input_size: int | None = DEMO_DEFAULTS["input_size"],
    epochs: float = DEMO_DEFAULTS["epochs"],
    max_train_samples: int | None = DEMO_DEFAULTS["max_train_samples"],
    max_eval_samples: int | None = DEMO_DEFAULTS["max_eval_samples"],
    batch_size: int = DEMO_DEFAULTS["batch_size"],
    learning_rate: float = DEMO_DEFAULTS["learning_rate"],
    weight_decay: float = DEMO_DEFAULTS["weight_decay"],
    r2_loss: str = DEMO_DEFAULTS["r2_loss"],
    r2_weight: float = DEMO_DEFAULTS["r2_weight"],
    r2_per_channel: bool = DEMO_DEFAULTS["r2_per_channel"],
    bits: int = DEMO_DEFAULTS["bits"],
    bn_samples: int = DEMO_DEFAULTS["bn_samples"],
    seed: int = DEMO_DEFAULTS["seed"],
    disable_tqdm: bool | None = None,
    print_fn: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Train `model` without and with R2-Loss, quantize both to `bits` bits, and report (see the module docstring).

    Both runs use the same data, seed, optimizer (AdamW with a cosine schedule), `weight_decay` and augmentation;
    they differ only in the R2 term (`r2_weight=0` for the baseline). They are saved under `output_dir/baseline`
    and `output_dir/r2_<loss>`, and the numbers in `output_dir/demo_results.json`.

    Args:
        output_dir (`str`, *optional*, defaults to `"outputs/demo"`):
            Where both runs and `demo_results.json` are written.
        model (`str`, *optional*, defaults to `"resnet10t"`):
            A timm (or transformers) model name, trained from scratch.
        dataset (`str`, *optional*, defaults to `"cifar10"`):
            Anything [`hf_r2.data.load_image_dataset`] takes.
        input_size (`int`, *optional*, defaults to `32`):
            Input side in pixels (CIFAR-10's native 32 uses the padded-crop + flip recipe).
        epochs (`float`, *optional*, defaults to `5.0`):
            Training epochs of each run.
        max_train_samples (`int`, *optional*, defaults to `10000`):
            Training examples (a seeded subset); `None` uses the whole split.
        max_eval_samples (`int`, *optional*, defaults to `2000`):
            Evaluation examples (a seeded subset of the test split); `None` uses the whole split.
        batch_size (`int`, *optional*, defaults to `64`):
            Training batch size.
        learning_rate (`float`, *optional*, defaults to `3e-3`):
            Peak learning rate of AdamW (cosine decay, 5% warm-up).
        weight_decay (`float`, *optional*, defaults to `0.05`):
            Decoupled weight decay, the same in both runs.
        r2_loss (`str`, *optional*, defaults to `"linf"`):
            The R2 variant of the second run.
        r2_weight (`float`, *optional*, defaults to `3.0`):
            Its coefficient lambda. Large next to the paper's because AdamW normalises each weight's step: what counts
            is that the R2 gradient of a channel's largest weight outweighs its task gradient.
        r2_per_channel (`bool`, *optional*, defaults to `True`):
            Apply R2 to each output channel's weights instead of each layer's (matches per-channel quantization).
        bits (`int`, *optional*, defaults to `2`):
            Weight bit width of the low-bit evaluation.
        bn_samples (`int`, *optional*, defaults to `512`):
            Training images (evaluation transform) for the batch-norm re-estimation.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the data subset, the initialisation and the data order, the same for both runs.
        disable_tqdm (`bool`, *optional*):
            Hide the Trainer's progress bars (`None`: the Trainer's default, shown on a terminal).
        print_fn (`Callable[[str], Any]`, *optional*, defaults to `print`):
            Where the report goes; `None` prints nothing.

    Returns:
        `dict`: `{"runs": {name: {...accuracies, "stats": R2Regularizer stats, "output_dir": ...}}, "settings": ...,
        "seconds": ...}`, as written to `demo_results.json`.
    """
    from .cli import DataArguments, ModelArguments, run_train
    from .config import R2Config
    from .data import load_image_dataset, with_transforms
    from .regularizer import R2Regularizer
    from .training_args import R2TrainingArguments

    settings = {k: v for k, v in locals().items() if k in DEMO_DEFAULTS}
    start = time.perf_counter()
    model_args = ModelArguments(model_name_or_path=model)
    data_args = DataArguments(dataset_name=dataset, input_size=input_size, max_train_samples=max_train_samples,
                              max_eval_samples=max_eval_samples)
    ds = load_image_dataset(dataset, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                            seed=seed)
    runs: dict[str, dict[str, Any]] = {}
    r2_name = f"r2_{r2_loss}"
    for name, weight in (("baseline", 0.0), (r2_name, r2_weight)):
        run_dir = os.path.join(output_dir, name)
        if print_fn:
            print_fn(f"\n=== {name}: {model} on {dataset}, {epochs:g} epochs of {ds['train'].num_rows} images, "
                     f"R2 {r2_loss if weight else 'off'} (lambda={weight:g}) ===")
        training_args = R2TrainingArguments(
            output_dir=run_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=256,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            logging_steps=50,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            seed=seed,
            dataloader_pin_memory=False,
            disable_tqdm=disable_tqdm,
            r2_loss=r2_loss,
            r2_weight=weight,
            r2_per_channel=r2_per_channel,
        )
        results = run_train(model_args, data_args, training_args)
        trained = results["trainer"].model.eval()
        eval_loader = _loader(with_transforms(ds["test"], trained, train=False, input_size=input_size), 256)
        bn_rows = ds["train"].select(range(min(bn_samples, ds["train"].num_rows)))
        bn_loader = _loader(with_transforms(bn_rows, trained, train=False, input_size=input_size), 64)
        runs[name] = {
            **_low_bit_results(trained, eval_loader, bn_loader, bits),
            "r2_weight": weight,
            "train_runtime": results["train"].get("train_runtime"),
            "stats": R2Regularizer(trained, R2Config()).stats(),
            "output_dir": run_dir,
        }
    summary = {"settings": settings, "runs": runs, "seconds": time.perf_counter() - start,
               "names": {"baseline": "baseline", "r2": r2_name}}
    write_json_atomic(os.path.join(output_dir, "demo_results.json"), summary, default=float)
    if print_fn:
        print_fn(format_report(summary))
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The text tables of a [`run_demo`] result: the summary, the per-layer ranges, where outputs went."""
    s = summary["settings"]
    base_name, r2_name = summary["names"]["baseline"], summary["names"]["r2"]
    base, r2 = summary["runs"][base_name], summary["runs"][r2_name]
    bits = s["bits"]
    lines = [
        "",
        f"hf-r2 demo: {s['model']} on {s['dataset']} ({s['epochs']:g} epochs, input {s['input_size']} px), "
        f"W{bits} = {bits}-bit symmetric per-channel round-to-nearest weights (all Conv/Linear layers); "
        f"BN = batch-norm statistics re-estimated on {s['bn_samples']} training images.",
        "",
        f"| run | FP top-1 | W{bits} top-1 | W{bits} + BN top-1 | largest abs(w) | mean max abs(w)/std |",
        "|---|---|---|---|---|---|",
    ]
    for label, run in ((f"baseline (no R2, weight decay {s['weight_decay']:g})", base),
                       (f"R2 {s['r2_loss']}{' per channel' if s.get('r2_per_channel') else ''} "
                        f"(lambda={s['r2_weight']:g})", r2)):
        overall = run["stats"]["overall"]
        lines.append(
            f"| {label} | {100 * run['fp_accuracy']:.2f}% | {100 * run['low_bit_accuracy']:.2f}% | "
            f"{100 * run['low_bit_bn_accuracy']:.2f}% | {overall['max_abs']:.4f} | "
            f"{overall['mean_max_over_std']:.2f} |"
        )
    lines += ["", "Per-layer weight range [min, max] (max abs(w) / std in parentheses):", "",
              "| layer | baseline | R2 |", "|---|---|---|"]
    r2_layers = r2["stats"]["per_layer"]
    for layer, b in base["stats"]["per_layer"].items():
        r = r2_layers.get(layer)
        r_text = f"[{r['min']:+.3f}, {r['max']:+.3f}] ({r['max_over_std']:.1f})" if r else "-"
        lines.append(f"| {layer} | [{b['min']:+.3f}, {b['max']:+.3f}] ({b['max_over_std']:.1f}) | {r_text} |")
    out = s["output_dir"]
    lines += [
        "",
        f"Saved: {base['output_dir']} (baseline), {r2['output_dir']} (R2): model.safetensors + config.json "
        f"(load with hf_r2.create_model(folder, pretrained=True) or timm), r2_config.json, r2_stats.json, "
        f"eval_results.json; numbers in {os.path.join(out, 'demo_results.json')}.",
        f"Total time: {summary['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_r2.demo [flags]`: the same as `hf-r2 demo [flags]`."""
    from .cli import main as cli_main

    return cli_main(["demo", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
