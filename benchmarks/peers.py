"""hf-r2's low-bit methods against established implementations, on the same trained models, calibration data and
settings: top-1, wall time and peak memory, with an honest reading of each pair of rows.

Three comparisons, each row run in its own fresh subprocess (so its peak resident memory is its own, measured as
`benchmarks/dkm_memory.py` measures it, through the shared `benchmarks/_peak_memory.py`):

- `palettize`: hf-r2's `palettize_` (`PalettizeConfig(method="kmeans")`) against coremltools'
  `PostTrainingPalettizer`, at 1 / 2 / 4 bits (`--palettize-bits`), one palette per tensor and one per
  `--group-size` output channels;
- `dkm`: hf-r2's `prepare_dkm` + fine-tune + `finalize_dkm` against coremltools' `DKMPalettizer` (`prepare` +
  fine-tune calling `step()` + `finalize`), at `--dkm-bits`, one palette per tensor, the same `--dkm-steps` fine-tune;
- `adaround`: hf-r2's `quantize_(model, PTQConfig(rounding="nearest" / "adaround"))` against Brevitas'
  `layerwise_quantize` (round to nearest) and its learned-round trainer (AdaRound, shipped in the brevitas wheel as
  `brevitas_examples`), at W4A8 and W2A8 (`--ptq-bits`), weights per output channel, with each of Brevitas' two
  integer weight grids (`--brevitas-grid`).

Common to every row: the first and the last Conv/Linear layer (in registration order) get 8 bits (palettes of 256
entries, or 8-bit weights and inputs), every other layer the row's bits; batch-norm statistics are re-estimated by
the same function ([`hf_r2.quant.reestimate_bn_stats`]) on the same `--calibration-samples` training images
(evaluation transform, batches of 64) after the weights are final, for hf-r2 and the peer alike (coremltools has
no re-estimation of its own, and Brevitas' `norm_correction_mode` blends old and new variances, so neither would
match hf-r2's). The settings that still differ are printed under each table.

Columns: top-1 on the first `--eval-samples` images of the test split (seeded shuffle); `seconds` from the float
model to the low-bit model (calibration, fine-tune and BN re-estimation included; imports, data loading and
evaluation excluded); `peak MiB` the process' peak resident set during that phase and `+MiB` its growth over the
resident set at its start (the model, the data and the toolkit already loaded). By default the workers keep
glibc's allocator settings (`--allocator default`: what a CPU user sees, freed heap that glibc keeps included);
`--allocator exact` makes the peak track live tensors, as `dkm_memory.py` does by default, but its page faults slow
every row down 2-4x, so its seconds are not representative. The honest reading compares the
two rows of a pair image by image: hf-r2 *matches* the peer when the top-1 difference is within 1.96 standard errors
of a paired difference (`sqrt(b + c - (b - c)^2 / n) / n`, with `b`, `c` the images only one of the two gets right),
and otherwise *beats* or *trails* it by that difference; then the ratios of time and of memory growth.

The peers are benchmark-only dependencies: `pip install -e ".[bench]"` (coremltools, brevitas). A missing peer is
skipped with a line that says so. Linux only (`/proc/self/status`).

    python benchmarks/peers.py           # both demo models, every comparison: about an hour on 2 idle cores
    python benchmarks/peers.py --eval-samples 200 --calibration-samples 64 --dkm-steps 3 --adaround-iters 20 \\
        --model-dir outputs/demo/runs/resnet10t/linf-pc-w3/seed0 --only palettize    # smoke run, under a minute
    python benchmarks/peers.py --only adaround --brevitas-grid narrow --threads 2
    python benchmarks/peers.py --dry-run # the planned rows and the settings that differ, nothing run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared helper beside this script, also when the tests import it
    sys.path.insert(0, _HERE)

from _peak_memory import ALLOCATORS, WorkerError, peak_kib, reset_peak, run_json_worker  # noqa: E402

__all__ = [
    "BREVITAS_GRIDS",
    "COMPARISONS",
    "PEERS",
    "brevitas_ptq_settings",
    "coreml_dkm_config",
    "coreml_ptp_config",
    "differences",
    "hf_dkm_config",
    "hf_palettize_configs",
    "hf_ptq_config",
    "main",
    "plan",
    "verdict",
]

COMPARISONS = ("palettize", "dkm", "adaround")

#: peer -> (the import that must work, what `pip install -e ".[bench]"` brings, the comparisons that need it)
PEERS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "coremltools": (("coremltools",), "coremltools>=8.0", ("palettize", "dkm")),
    "brevitas": (("brevitas", "brevitas_examples"), "brevitas>=0.13", ("adaround",)),
}
_PEER_OF = {comparison: peer for peer, (_, _, comparisons) in PEERS.items() for comparison in comparisons}
_INSTALL = 'pip install -e ".[bench]"'

_DEMO_MODELS = [os.path.join("outputs", "demo", "runs", "resnet10t", v, "seed0") for v in ("baseline", "linf-pc-w3")]
_FIRST_LAST_BITS = 8
_CALIBRATION_BATCH = 64
_DKM_BATCH = 64
_A_BITS = 8
# Brevitas' learned-round trainer draws whole images per step; this is its `TrainingArgs` default.
_BREVITAS_BATCH_IMAGES = 8
#: Brevitas' two symmetric integer weight grids, name -> `narrow_range`: `narrow` ({-1, 0, 1} x s at 2 bits) is its
#: quantizer classes' default, `full` ({-2, -1, 0, 1} x s) its ImageNet PTQ example's; hf-r2's mid-rise grid is
#: neither, so both are compared.
BREVITAS_GRIDS = {"narrow": True, "full": False}


def _log(message: str = "") -> None:
    print(message, flush=True)


def _load_text() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every OS
        return "load average n/a"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_available(peer: str) -> bool:
    """Whether every module the peer needs can be found (nothing is imported)."""
    modules, _, _ = PEERS[peer]
    return all(importlib.util.find_spec(m) is not None for m in modules)


# ---- the settings of each implementation, as plain data (the workers build the configs from these) ----------------


def _anchored(names: list[str]) -> list[str]:
    return [f"^{re.escape(n)}$" for n in names]


def hf_palettize_configs(bits: int, group_size: int | None, first: str, last: str) -> list[dict[str, Any]]:
    """`PalettizeConfig` fields for hf-r2's k-means rows, applied with `palettize_` in this order: the first and the
    last layer at 8 bits with one palette per tensor, then every other layer at `bits`, per tensor or per group."""
    ends = _anchored([first, last])
    return [
        {"bits": _FIRST_LAST_BITS, "method": "kmeans", "include": ends},
        {"bits": bits, "method": "kmeans", "group_size": group_size, "exclude": ends},
    ]


def coreml_ptp_config(bits: int, group_size: int | None, first: str, last: str) -> dict[str, Any]:
    """`PostTrainingPalettizerConfig.from_dict` input matching [`hf_palettize_configs`]: coremltools' own defaults
    otherwise (fast k-means mode, float palettes)."""
    if group_size is None:
        layer = {"n_bits": bits, "granularity": "per_tensor"}
    else:
        layer = {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": group_size, "channel_axis": 0}
    ends = {"n_bits": _FIRST_LAST_BITS, "granularity": "per_tensor"}
    return {"global_config": layer, "module_name_configs": {first: dict(ends), last: dict(ends)}}


def hf_dkm_config(bits: int) -> dict[str, Any]:
    """`PalettizeConfig` fields of hf-r2's DKM rows (`prepare_dkm`): one palette per tensor, first and last layer at
    8 bits, hf-r2's defaults otherwise (temperature 1.0 relative, 3 iterations, k-means initial centroids)."""
    return {"bits": bits, "method": "dkm", "first_last_bits": _FIRST_LAST_BITS}


def coreml_dkm_config(bits: int, first: str, last: str) -> dict[str, Any]:
    """`DKMPalettizerConfig.from_dict` input matching [`hf_dkm_config`]: every layer clustered (`weight_threshold=0`;
    coremltools' default 2048 leaves small layers in float), initial centroids by 1-D k-means as hf-r2's
    (`kmeans_init="opt1d"`; its default picks k-means++ above 1024 weights), 3 iterations per forward (its default
    `kmeans_max_iter`), its own temperature otherwise."""
    layer = {"n_bits": bits, "weight_threshold": 0, "kmeans_init": "opt1d", "kmeans_max_iter": 3}
    ends = {**layer, "n_bits": _FIRST_LAST_BITS}
    return {"global_config": layer, "module_name_configs": {first: dict(ends), last: dict(ends)}}


def hf_ptq_config(w_bits: int, rounding: str, adaround_iters: int, calibration_batches: int) -> dict[str, Any]:
    """`PTQConfig` fields of hf-r2's PTQ rows: `w_bits`/A8, per-channel MSE weight ranges, MSE activation ranges,
    first and last layer at 8 bits, BN re-estimated after rounding, every calibration batch used."""
    return {
        "w_bits": w_bits,
        "a_bits": _A_BITS,
        "per_channel": True,
        "weight_range": "mse",
        "act_observer": "mse",
        "first_last_bits": _FIRST_LAST_BITS,
        "rounding": rounding,
        "adaround": {"iters": adaround_iters} if rounding == "adaround" else None,
        "bn": "reestimate",
        "calibration_batches": calibration_batches,
    }


def brevitas_ptq_settings(
    w_bits: int, rounding: str, adaround_iters: int, adaround_lr: float, grid: str = "narrow"
) -> dict[str, Any]:
    """The Brevitas counterpart of [`hf_ptq_config`]: quantizer classes (by name in `brevitas.quant`), bit widths
    and the learned-round (AdaRound) trainer's settings, matched to hf-r2's AdaRound defaults where Brevitas has the
    knob (iterations, learning rate, regulariser weight, beta range, warm-up). `grid` is Brevitas' weight grid
    (see [`BREVITAS_GRIDS`])."""
    if grid not in BREVITAS_GRIDS:
        raise ValueError(f"`grid` must be one of {list(BREVITAS_GRIDS)}, got {grid!r}.")
    settings: dict[str, Any] = {
        "weight_quant": "Int8WeightPerChannelFloatMSE",  # symmetric, per output channel, MSE scale
        "narrow_range": BREVITAS_GRIDS[grid],
        "input_quant": "ShiftedUint8ActPerTensorFloatMSE",  # asymmetric, per tensor, MSE range
        "w_bits": w_bits,
        "a_bits": _A_BITS,
        "first_last_bits": _FIRST_LAST_BITS,
        "bias_quant": None,
        "rounding": rounding,
    }
    if rounding == "adaround":
        settings["learned_round"] = {
            "param": "hard_sigmoid",  # AdaRound's rectified sigmoid, zeta 1.1, gamma -0.1
            "iters": adaround_iters,
            "lr": adaround_lr,
            "batch_images": _BREVITAS_BATCH_IMAGES,
            "reg": {"weight": 0.01, "b_range": (20, 2), "warmup": 0.2, "max_count": adaround_iters},
            "use_best_model": False,
            "use_amp": False,
        }
    return settings


def differences(comparison: str, args: argparse.Namespace) -> list[str]:
    """The settings that still differ between hf-r2 and the peer of `comparison` (printed under its table)."""
    if comparison == "palettize":
        return [
            "Clustering: coremltools runs exact optimal 1-D k-means (`kmeans1d`) for every palette; hf-r2's "
            "`kmeans_1d` starts from the optimal partition of the sorted weights cut into max(32, 8k) equal-count "
            "runs (k <= 16 centroids) or from quantiles (the 256-entry palettes of the first and last layer), then "
            "runs Lloyd iterations (at most 50): near-optimal, not exact.",
            "coremltools' default fast mode clusters the weights cast to float16 and rounded to multiples of 1e-4, "
            "weighted by their counts; hf-r2 clusters the float32 weights as they are. Both keep float32 palettes.",
            f"Groups: `group_size={args.group_size}` output channels per palette in both (coremltools "
            "`per_grouped_channel` on axis 0); the first and last layer get one 8-bit palette per tensor in both "
            "(hf-r2: a second `palettize_` call with `include`; coremltools: `module_name_configs`).",
            "coremltools clusters in one process (`num_kmeans_workers=1`, its default), hf-r2 in-process; both with "
            f"{args.threads} torch thread(s).",
        ]
    if comparison == "dkm":
        return [
            "Temperature: hf-r2 `tau = 1.0 x` the mean squared distance of each palette's weights to their nearest "
            "initial centroid; coremltools `palett_tau = 1e-4` (absolute). Each toolkit's default.",
            "Iterations: 3 differentiable k-means updates per forward pass in both, warm-started from the previous "
            "step's centroids; coremltools stops early when the inertia changes by at most `palett_epsilon=1e-4` "
            "and re-splits duplicate centroids, hf-r2 always runs 3.",
            "Attention floor: coremltools clamps each attention at 1e-7; hf-r2 floors it at exp(-50) times the "
            "nearest centroid's and recomputes it in chunks in the backward pass (bounded memory).",
            "Initial centroids and layers: 1-D k-means in both (coremltools' exact `kmeans_init='opt1d'`, set here; "
            "hf-r2's near-optimal `kmeans_1d`) and every Conv/Linear clustered (coremltools `weight_threshold=0`, "
            "set here; the first and last at 8 bits through `module_name_configs`).",
            f"Fine-tune, the same loop for both: {args.dkm_steps} steps of AdamW (lr {args.dkm_lr:g}, no weight "
            f"decay, cosine to 0), batches of {_DKM_BATCH} augmented training images in the same seeded order, no "
            "R2; coremltools' `palettizer.step()` after every optimizer step, as its docs ask.",
            "Finalize: each latent weight snapped to its nearest centroid in both (hf-r2 after one more no-grad DKM "
            "pass; coremltools with its last centroids).",
        ]
    if comparison == "adaround":
        return [
            "Weight grid: hf-r2's symmetric mid-rise grid (2^b levels, no zero level: {-1, -1/3, 1/3, 1} x c at 2 "
            "bits); Brevitas' symmetric integer grids, zero a level: `narrow` (`narrow_range=True`, its quantizers' "
            "default: 2^b - 1 levels, {-1, 0, 1} x s at 2 bits) and `full` (`narrow_range=False`, its ImageNet "
            "example's default: 2^b levels, {-2, -1, 0, 1} x s, whose largest positive level is half its largest "
            "negative one at 2 bits). Neither toolkit offers the other's grids.",
            "Weight range: per output channel and MSE in both: hf-r2 searches 100 clip ratios of max|w| from 1.0 "
            "to 0.2; Brevitas' `...FloatMSE` quantizers run their own MSE search.",
            "Activations: 8-bit asymmetric, per tensor, at the input of every quantized layer, MSE range in both; "
            "hf-r2 calibrates them with the quantized weights in place, Brevitas' `calibration_mode` observes the "
            "model with weight quantization off (its design). Biases stay float in both.",
            "AdaRound: the same rectified sigmoid, regulariser weight 0.01, beta 20 -> 2 after a 20 % warm-up "
            f"(hf-r2 cosine, Brevitas linear), Adam at lr {args.adaround_lr:g} for {args.adaround_iters} steps per "
            "layer, inputs from the model with the earlier layers rounded and activations unquantized (Brevitas' "
            "activation quantizers are off during its learned round, as hf-r2 calibrates them afterwards), targets "
            "from the float model.",
            f"AdaRound batches: hf-r2 256 rows (output positions) per step from up to 8192 cached per layer; "
            f"Brevitas {_BREVITAS_BATCH_IMAGES} whole images (every output position) per step from all calibration "
            "images. hf-r2 keeps round-to-nearest for a layer where AdaRound ends with a larger reconstruction "
            "error; Brevitas keeps the last iterate (`use_best_model=False`, as in its ImageNet example), float32 "
            "(`use_amp=False`).",
            "Order: rounding, BN re-estimation, then activation calibration in both (Brevitas' ImageNet example "
            "calibrates activations first).",
        ]
    raise ValueError(f"`comparison` must be one of {COMPARISONS}, got {comparison!r}.")


# ---- the plan -----------------------------------------------------------------------------------------------------


def _pairs(comparison: str, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """`(setting label, setting fields)` of each pair of rows of `comparison`."""
    if comparison == "palettize":
        out = []
        for bits in args.palettize_bits:
            for group_size in (None, args.group_size):
                where = "per tensor" if group_size is None else f"{group_size} ch/palette"
                out.append((f"W{bits} k-means, {where}", {"bits": bits, "group_size": group_size}))
        return out
    if comparison == "dkm":
        return [(f"W{b} DKM, {args.dkm_steps} steps", {"bits": b}) for b in args.dkm_bits]
    return [
        (f"W{b}A{_A_BITS} {'AdaRound' if r == 'adaround' else 'nearest'}", {"bits": b, "rounding": r})
        for b in args.ptq_bits
        for r in ("nearest", "adaround")
    ]


def _peer_variants(comparison: str, args: argparse.Namespace) -> list[str | None]:
    """The peer's variants of each setting: Brevitas' weight grids for `adaround`, one (`None`) otherwise."""
    if comparison == "adaround":
        return list(BREVITAS_GRIDS) if args.brevitas_grid == "both" else [args.brevitas_grid]
    return [None]


def _impl_label(spec: dict[str, Any], versions: dict[str, str | None] | None = None) -> str:
    impl = spec["impl"]
    name = impl if impl in ("hf-r2", "float") else f"{impl} {(versions or {}).get(impl) or ''}".strip()
    return name + (f" ({spec['peer_variant']} grid)" if spec.get("peer_variant") else "")


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One spec per row to run: per model, a float row, then per comparison and setting an hf-r2 row and the peer's
    row (comparisons whose peer is missing are left out)."""
    common = {
        k: getattr(args, k)
        for k in ("dataset", "eval_samples", "calibration_samples", "seed", "threads", "dkm_steps", "dkm_lr",
                  "adaround_iters", "adaround_lr")
    }
    rows = []
    for model_dir in args.model_dir:
        rows.append({**common, "model_dir": model_dir, "comparison": "float", "impl": "float", "setting": "FP"})
        for comparison in args.only:
            if comparison not in args.runnable:
                continue
            for label, fields in _pairs(comparison, args):
                impls = [("hf-r2", None)] + [(_PEER_OF[comparison], v) for v in _peer_variants(comparison, args)]
                for impl, variant in impls:
                    rows.append({**common, **fields, "model_dir": model_dir, "comparison": comparison,
                                 "impl": impl, "peer_variant": variant, "setting": label})
    return rows


# ---- the worker: one row, in its own process ----------------------------------------------------------------------


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("coremltools", "brevitas", "hf_r2", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _target_names(model) -> list[str]:
    """Conv/Linear layers with a weight, in registration order (hf-r2's rule for its targets)."""
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def _load_data(model, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hf_r2.data import calibration_batches, collate_fn, load_image_dataset, with_transforms

    ds = load_image_dataset(spec["dataset"], max_eval_samples=spec["eval_samples"], seed=spec["seed"])
    loader = torch.utils.data.DataLoader(
        with_transforms(ds["test"], model, train=False), batch_size=250, shuffle=False, collate_fn=collate_fn
    )
    data = {
        "eval": list(loader),
        "calibration": calibration_batches(
            ds["train"], model, spec["calibration_samples"], seed=spec["seed"], batch_size=_CALIBRATION_BATCH
        ),
    }
    if spec["comparison"] == "dkm":
        data["train"] = with_transforms(ds["train"], model, train=True, seed=spec["seed"])
    return data


def _finetune(model, data: dict[str, Any], spec: dict[str, Any], after_step=None) -> None:
    """The DKM fine-tune, the same for both: AdamW (no weight decay), cosine to 0, seeded batches, plain CE."""
    import torch
    import torch.nn.functional as F

    from hf_r2.data import collate_fn
    from hf_r2.models import forward_logits

    steps = spec["dkm_steps"]
    loader = torch.utils.data.DataLoader(
        data["train"], batch_size=_DKM_BATCH, shuffle=True, drop_last=True, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(spec["seed"]),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["dkm_lr"], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss = F.cross_entropy(forward_logits(model, batch["pixel_values"]), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            done += 1
            if done == steps:
                break
    model.eval()


def _bn(model, data: dict[str, Any]) -> None:
    from hf_r2.quant import reestimate_bn_stats

    reestimate_bn_stats(model, data["calibration"], num_batches=None)


def _hf_kmeans(model, data, spec):
    from hf_r2.quant import PalettizeConfig, palettize_

    names = _target_names(model)
    for fields in hf_palettize_configs(spec["bits"], spec["group_size"], names[0], names[-1]):
        palettize_(model, PalettizeConfig(**fields))
    _bn(model, data)
    return model


def _coreml_kmeans(model, data, spec):
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    names = _target_names(model)
    config = PostTrainingPalettizerConfig.from_dict(
        coreml_ptp_config(spec["bits"], spec["group_size"], names[0], names[-1])
    )
    model = PostTrainingPalettizer(model, config).compress(inplace=True)
    _bn(model, data)
    return model


def _hf_dkm(model, data, spec):
    from hf_r2.quant import PalettizeConfig, finalize_dkm, prepare_dkm

    prepare_dkm(model, PalettizeConfig(**hf_dkm_config(spec["bits"])))
    _finetune(model, data, spec)
    finalize_dkm(model)
    _bn(model, data)
    return model


def _coreml_dkm(model, data, spec):
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    names = _target_names(model)
    config = DKMPalettizerConfig.from_dict(coreml_dkm_config(spec["bits"], names[0], names[-1]))
    palettizer = DKMPalettizer(model, config)
    model = palettizer.prepare(inplace=True)
    _finetune(model, data, spec, after_step=palettizer.step)
    model = palettizer.finalize(inplace=True)
    _bn(model, data)
    return model


def _hf_ptq(model, data, spec):
    from hf_r2.quant import PTQConfig, quantize_

    fields = hf_ptq_config(spec["bits"], spec["rounding"], spec["adaround_iters"], len(data["calibration"]))
    quantize_(model, PTQConfig(**fields), data["calibration"])
    return model


def _brevitas_layer_map(settings: dict[str, Any], w_bits: int, a_bits: int) -> dict:
    import brevitas.nn as qnn
    import brevitas.quant as bq
    from torch import nn

    kwargs = {
        "weight_quant": getattr(bq, settings["weight_quant"]).let(
            bit_width=w_bits, narrow_range=settings["narrow_range"]
        ),
        "input_quant": getattr(bq, settings["input_quant"]).let(bit_width=a_bits),
        "bias_quant": settings["bias_quant"],
        "return_quant_tensor": False,
    }
    return {nn.Conv2d: (qnn.QuantConv2d, kwargs), nn.Linear: (qnn.QuantLinear, kwargs)}


def _brevitas_ptq(model, data, spec):
    import contextlib
    import functools

    import torch
    from brevitas.graph.calibrate import calibration_mode, quantization_status_manager
    from brevitas.graph.quantize import layerwise_quantize

    settings = brevitas_ptq_settings(
        spec["bits"], spec["rounding"], spec["adaround_iters"], spec["adaround_lr"], spec["peer_variant"]
    )
    names = _target_names(model)
    fl = settings["first_last_bits"]
    # the first and last layer at 8 bits, then every other layer (already-quantized layers are not matched again)
    model = layerwise_quantize(model, _brevitas_layer_map(settings, fl, fl), name_blacklist=names[1:-1])
    model = layerwise_quantize(model, _brevitas_layer_map(settings, settings["w_bits"], settings["a_bits"]))
    missing = [n for n in names if not type(model.get_submodule(n)).__name__.startswith("Quant")]
    if missing:
        raise RuntimeError(f"Brevitas left these layers unquantized: {missing}")
    batches = [(b["pixel_values"], b["labels"]) for b in data["calibration"]]
    model.eval()
    with quantization_status_manager(model, disable_act_quant=True):
        if spec["rounding"] == "adaround":
            from brevitas_examples.common.learned_round.learned_round_args import (
                HandlerSpec,
                LossArgs,
                OptimizerArgs,
                TrainerConfig,
                TrainingArgs,
            )
            from brevitas_examples.common.learned_round.learned_round_method import LearnedRoundArgs
            from brevitas_examples.common.learned_round.learned_round_trainer import LearnedRoundTrainer, get_blocks
            from brevitas_examples.imagenet_classification.ptq.learned_round_utils import (
                CacheVision,
                is_layer,
                vision_block_forward,
                vision_forward,
            )

            lr = settings["learned_round"]
            reg = dict(lr["reg"])
            config = TrainerConfig(
                training_args=TrainingArgs(
                    optimizers_args=[OptimizerArgs(target_params="learned_round", optimizer_cls="Adam", lr=lr["lr"],
                                                   optimizer_kwargs={})],
                    batch_size=lr["batch_images"],
                    iters=lr["iters"],
                    losses_args=[LossArgs(cls="round_reg", kwargs=reg),
                                 LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1})],
                    use_best_model=lr["use_best_model"],
                    use_amp=lr["use_amp"],
                    fast_update=False,
                ),
                training_handlers=[HandlerSpec[LearnedRoundArgs](
                    name="learned_round",
                    config=LearnedRoundArgs(learned_round_param=lr["param"], learned_round_kwargs=None),
                )],
            )
            with contextlib.redirect_stdout(sys.stderr):  # its progress prints; stdout carries the result
                LearnedRoundTrainer(config=config).train(
                    model=model, model_forward=vision_forward, block_forward=vision_block_forward,
                    data_loader=batches, cache=CacheVision(),
                    get_blocks_fn=functools.partial(get_blocks, block_check_fn=is_layer), keep_gpu=True,
                )
        _bn(model, data)
    with torch.no_grad(), calibration_mode(model):
        for images, _ in batches:
            model(images)
    model.eval()
    return model


_METHODS = {
    ("float", "float"): lambda model, data, spec: model,
    ("palettize", "hf-r2"): _hf_kmeans,
    ("palettize", "coremltools"): _coreml_kmeans,
    ("dkm", "hf-r2"): _hf_dkm,
    ("dkm", "coremltools"): _coreml_dkm,
    ("adaround", "hf-r2"): _hf_ptq,
    ("adaround", "brevitas"): _brevitas_ptq,
}


def _unclustered(model, spec: dict[str, Any]) -> list[str]:
    """Layers whose weight has more distinct values per palette than the row's setting allows (a layer a toolkit
    skipped, or did not snap to its palette): the first and last at 8 bits, the others at the row's bits, one
    palette per tensor or per `group_size` output channels."""
    names = _target_names(model)
    bad = []
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        ends = name in (names[0], names[-1])
        groups = 1 if ends or not spec.get("group_size") else weight.shape[0] // spec["group_size"]
        limit = 2 ** (_FIRST_LAST_BITS if ends else spec["bits"])
        if max(row.unique().numel() for row in weight.reshape(groups, -1)) > limit:
            bad.append(name)
    return bad


def _import_toolkit(impl: str) -> None:
    """Import the row's toolkit before the measured phase, so that its import is not timed."""
    import hf_r2.quant  # noqa: F401

    if impl == "coremltools":
        import coremltools.optimize.torch.palettization  # noqa: F401
    elif impl == "brevitas":
        import brevitas.graph.quantize  # noqa: F401
        import brevitas_examples.common.learned_round.learned_round_trainer  # noqa: F401


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    import torch

    from hf_r2.models import create_model, forward_logits

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = create_model(spec["model_dir"], pretrained=True).eval()
    data = _load_data(model, spec)
    _import_toolkit(spec["impl"])
    method = _METHODS[(spec["comparison"], spec["impl"])]
    before = reset_peak()
    start = time.perf_counter()
    model = method(model, data, spec)
    seconds = time.perf_counter() - start
    peak = peak_kib()
    model.eval()
    unclustered = _unclustered(model, spec) if spec["comparison"] in ("palettize", "dkm") else []
    correct = []
    with torch.no_grad():
        for batch in data["eval"]:
            correct += (forward_logits(model, batch["pixel_values"]).argmax(-1) == batch["labels"]).tolist()
    return {
        "top1": sum(correct) / len(correct),
        "correct": "".join("1" if c else "0" for c in correct),
        "seconds": seconds,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - before) / 1024,
        "threads": torch.get_num_threads(),
        "calibration_images": sum(len(b["labels"]) for b in data["calibration"]),
        "unclustered": unclustered,
    }


# ---- the report ---------------------------------------------------------------------------------------------------


def verdict(hf: dict[str, Any], peer: dict[str, Any], peer_name: str) -> str:
    """The honest reading of one pair of rows (see the module docstring)."""
    a, b = hf["correct"], peer["correct"]
    if len(a) != len(b):
        raise ValueError(f"the rows were evaluated on different images ({len(a)} and {len(b)})")
    n = len(a)
    only_hf = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_peer = sum(x == "0" and y == "1" for x, y in zip(a, b))
    diff = 100 * (only_hf - only_peer) / n
    se = 100 * math.sqrt(max(0.0, only_hf + only_peer - (only_hf - only_peer) ** 2 / n)) / n
    band = max(1.96 * se, 100 / n)  # never finer than one image
    if abs(diff) <= band:
        word = f"matches {peer_name} ({diff:+.2f} pp, within +-{band:.2f} pp)"
    else:
        word = f"{'beats' if diff > 0 else 'trails'} {peer_name} by {abs(diff):.2f} pp (+-{band:.2f} pp)"
    parts = [f"hf-r2 {word}"]
    if peer["seconds"] > 0:
        parts.append(f"{hf['seconds'] / peer['seconds']:.2f}x its time")
    if peer["growth_mib"] > 0:
        parts.append(f"{hf['growth_mib'] / peer['growth_mib']:.2f}x its memory growth")
    return "; ".join(parts)


_TITLES = {
    "palettize": "k-means palettization: hf-r2 `palettize_` vs coremltools `PostTrainingPalettizer`",
    "dkm": "DKM: hf-r2 `prepare_dkm` / `finalize_dkm` vs coremltools `DKMPalettizer`",
    "adaround": "PTQ: hf-r2 `quantize_(PTQConfig(rounding=...))` vs Brevitas `layerwise_quantize` + learned round",
}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return "failed" if "error" in row else format(row[key] * (100 if key == "top1" else 1), fmt)


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, versions: dict[str, str | None]) -> str:
    out = []
    for model_dir in args.model_dir:
        mine = [r for r in rows if r["spec"]["model_dir"] == model_dir]
        fp = next((r for r in mine if r["spec"]["comparison"] == "float"), None)
        fp_text = f"{100 * fp['top1']:.2f} %" if fp and "error" not in fp else "n/a"
        for comparison in args.only:
            pair_rows = [r for r in mine if r["spec"]["comparison"] == comparison]
            if not pair_rows:
                continue
            peer = _PEER_OF[comparison]
            n = next((len(r["correct"]) for r in pair_rows if "correct" in r), 0)
            cal = next((r["calibration_images"] for r in pair_rows if "calibration_images" in r), 0)
            out += [
                f"\n## {_TITLES[comparison]}\n",
                f"Model {model_dir} (float top-1 {fp_text}); {n} test images, {cal} calibration images, "
                f"{args.threads} thread(s), allocator {args.allocator}.\n",
                "| implementation | setting | top-1 % | seconds | peak MiB | +MiB |",
                "|---|---|---|---|---|---|",
            ]
            notes = []
            for r in pair_rows:
                out.append(
                    f"| {_impl_label(r['spec'], versions)} | {r['spec']['setting']} | {_cell(r, 'top1', '.2f')} | "
                    f"{_cell(r, 'seconds', '.1f')} | {_cell(r, 'peak_mib', '.0f')} | {_cell(r, 'growth_mib', '.0f')} |"
                )
                if r.get("unclustered"):
                    notes.append(f"- WARNING: {_impl_label(r['spec'])} {r['spec']['setting']} left layers with more "
                                 f"distinct values than their palettes allow: {', '.join(r['unclustered'])}.")
            out += ["", *notes] if notes else []
            out.append("\nHonest reading:\n")
            for label, _ in _pairs(comparison, args):
                same = [r for r in pair_rows if r["spec"]["setting"] == label]
                hf = next((r for r in same if r["spec"]["impl"] == "hf-r2"), None)
                for other in (r for r in same if r["spec"]["impl"] == peer):
                    name = _impl_label(other["spec"])
                    if hf is None:
                        continue
                    if "error" in hf or "error" in other:
                        failed = [k for k, v in (("hf-r2", hf), (name, other)) if "error" in v]
                        out.append(f"- {label}: no reading, {' and '.join(failed)} failed.")
                    else:
                        out.append(f"- {label}: {verdict(hf, other, name)}.")
            out.append("\nSettings that still differ:\n")
            out += [f"- {d}" for d in differences(comparison, args)]
    return "\n".join(out)


# ---- entry point --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", nargs="+", default=None,
                        help="Folders of trained models (`hf-r2 train` / `hf-r2 reproduce` / `make demo`); default: "
                             "the demo's resnet10t baseline and linf-pc-w3 runs.")
    parser.add_argument("--dataset", default=None,
                        help="Dataset (hf_r2.data.load_image_dataset); default: the one in the model folder's "
                             "reproduce_run.json, else cifar10.")
    parser.add_argument("--eval-samples", type=int, default=10000, help="Test images each row is evaluated on.")
    parser.add_argument("--calibration-samples", type=int, default=512,
                        help="Training images for calibration, AdaRound and BN re-estimation.")
    parser.add_argument("--dkm-steps", type=int, default=100, help="Fine-tuning steps of both DKM implementations.")
    parser.add_argument("--dkm-lr", type=float, default=1e-3, help="Fine-tuning learning rate (AdamW, cosine).")
    parser.add_argument("--dkm-bits", type=int, nargs="+", default=[2], help="Bits of the DKM rows.")
    parser.add_argument("--palettize-bits", type=int, nargs="+", default=[1, 2, 4], help="Bits of the k-means rows.")
    parser.add_argument("--group-size", type=int, default=16, help="Output channels per palette in grouped rows.")
    parser.add_argument("--ptq-bits", type=int, nargs="+", default=[4, 2], help="Weight bits of the PTQ rows (A8).")
    parser.add_argument("--adaround-iters", type=int, default=None,
                        help="AdaRound steps per layer, both toolkits (default: hf-r2's AdaRoundConfig default).")
    parser.add_argument("--adaround-lr", type=float, default=None,
                        help="AdaRound learning rate, both toolkits (default: hf-r2's AdaRoundConfig default).")
    parser.add_argument("--brevitas-grid", choices=(*BREVITAS_GRIDS, "both"), default="both",
                        help="Brevitas' weight grid(s) in the adaround comparison (narrow: {-1, 0, 1} x s at 2 bits, "
                             "its quantizers' default; full: {-2, -1, 0, 1} x s, its ImageNet example's).")
    parser.add_argument("--only", nargs="+", choices=COMPARISONS, default=list(COMPARISONS),
                        help="Run only these comparisons.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (OMP_NUM_THREADS) of every worker.")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="default",
                        help="glibc allocator settings of the workers (see benchmarks/_peak_memory.py).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data subsets, shuffles and fine-tunes.")
    parser.add_argument("--output-dir", default=os.path.join("outputs", "bench_peers"),
                        help="Where peers_results.json and .md go.")
    parser.add_argument("--dry-run", action="store_true", help="Print the planned rows and settings, run nothing.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _model_dataset(model_dir: str) -> str | None:
    try:
        with open(os.path.join(model_dir, "reproduce_run.json"), encoding="utf-8") as f:
            return json.load(f)["spec"]["dataset"]
    except (OSError, KeyError, ValueError):
        return None


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Defaults that depend on the machine: the model folders, the dataset, AdaRound's defaults, runnable peers."""
    if args.model_dir is None:
        args.model_dir = [d for d in _DEMO_MODELS if os.path.isdir(d)]
        if not args.model_dir:
            parser.error(f"no --model-dir given and no demo model in {_DEMO_MODELS}: run `make demo` (or "
                         "`hf-r2 train`) first, or pass --model-dir.")
    for d in args.model_dir:
        if not args.dry_run and not os.path.isfile(os.path.join(d, "config.json")):
            parser.error(f"--model-dir {d!r} has no config.json (a folder saved by `hf-r2 train`).")
    if args.dataset is None:
        found = {_model_dataset(d) for d in args.model_dir} - {None}
        if len(found) > 1:
            parser.error(f"the models were trained on different datasets {sorted(found)}; pass --dataset.")
        args.dataset = found.pop() if found else "cifar10"
    if args.adaround_iters is None or args.adaround_lr is None:
        from hf_r2.quant import AdaRoundConfig

        default = AdaRoundConfig()
        args.adaround_iters = args.adaround_iters or default.iters
        args.adaround_lr = args.adaround_lr or default.lr
    for name in ("eval_samples", "calibration_samples", "dkm_steps", "threads", "group_size", "adaround_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("palettize_bits", "dkm_bits", "ptq_bits"):
        bad = [b for b in getattr(args, name) if not 1 <= b <= 8]
        if bad:
            parser.error(f"--{name.replace('_', '-')} takes bits from 1 to 8, got {bad}.")
    args.only = list(dict.fromkeys(args.only))
    args.runnable = [c for c in args.only if peer_available(_PEER_OF[c])]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    data_dir = os.path.abspath(os.path.join(_HERE, "..", "..", "shared", "data"))
    if "HF_R2_DATA_DIR" not in os.environ and os.path.isdir(data_dir):
        os.environ["HF_R2_DATA_DIR"] = data_dir  # as the Makefile sets it
    _resolve(args, parser)

    versions = {"torch": _version("torch"), "coremltools": _version("coremltools"), "brevitas": _version("brevitas")}
    _log(f"hf-r2 against peers: torch {versions['torch']}, coremltools {versions['coremltools'] or 'missing'}, "
         f"brevitas {versions['brevitas'] or 'missing'}; {args.threads} thread(s) per worker, allocator "
         f"{args.allocator}; {_load_text()}")
    for comparison in args.only:
        if comparison not in args.runnable:
            peer = _PEER_OF[comparison]
            _log(f"SKIPPED {comparison}: {peer} is not installed (it needs {PEERS[peer][1]}); install the benchmark "
                 f"extra with `{_INSTALL}` to compare against it.")
    rows = plan(args)
    _log(f"Dataset {args.dataset}; {len(rows)} rows, each in a fresh subprocess; AdaRound {args.adaround_iters} "
         f"steps/layer at lr {args.adaround_lr:g}; DKM {args.dkm_steps} fine-tune steps at lr {args.dkm_lr:g}.")
    if args.dry_run:
        for spec in rows:
            _log(f"  {spec['model_dir']} | {spec['comparison']} | {_impl_label(spec, versions)} | {spec['setting']}")
        for comparison in args.runnable:
            _log(f"\nSettings that still differ ({comparison}):")
            for line in differences(comparison, args):
                _log(f"- {line}")
        return 0

    start = time.perf_counter()
    results = []
    for i, spec in enumerate(rows, 1):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        try:
            row = run_json_worker(cmd, threads=args.threads, allocator=args.allocator)
            status = (f"{100 * row['top1']:6.2f} %  {row['seconds']:7.1f} s  peak {row['peak_mib']:6.0f} MiB "
                      f"(+{row['growth_mib']:.0f})")
        except WorkerError as err:
            row = {"error": str(err), "stderr": err.stderr}
            status = f"FAILED: {err}"
        results.append({"spec": spec, **row})
        _log(f"[{i}/{len(rows)}] {os.path.basename(os.path.dirname(spec['model_dir']))} {spec['comparison']:<9} "
             f"{_impl_label(spec):<22} {spec['setting']:<26} {status}")
    report = _report(results, args, versions)
    report += f"\n\nTotal {time.perf_counter() - start:.0f} s; {_load_text()} at the end."
    _log(report)
    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir, "peers_results")
    with open(out + ".json", "w", encoding="utf-8") as f:
        saved = {k: v for k, v in vars(args).items()}
        json.dump({"args": saved, "versions": versions, "rows": results}, f, indent=2, default=str)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(report.lstrip() + "\n")
    _log(f"\nResults: {out}.json (and .md)")
    failed = [r for r in results if "error" in r]
    for r in failed:
        _log(f"\n{_impl_label(r['spec'])} {r['spec']['setting']} failed; its stderr ends with:\n"
             + "\n".join(r["stderr"].strip().splitlines()[-12:]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
