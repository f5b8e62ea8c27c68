"""The descriptive sections of a model card: the R2 settings (`r2_config.json`), the weight ranges
(`r2_stats.json`), the training hyperparameters (`r2_training.json`), how to load the model, and its license."""

from __future__ import annotations

from typing import Any

__all__ = ["format_number", "license_section", "r2_section", "stats_section", "training_section", "usage_section"]

# Rows of the per-layer range table; larger models list the layers with the largest max/std first, then stop.
_MAX_LAYER_ROWS = 60


def format_number(value: Any) -> str:
    """A number as the card's tables print it: 4 significant digits, `-` for none."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def r2_section(r2_config: dict[str, Any] | None) -> str:
    if not r2_config:
        return "## R2 settings\n\nNo `r2_config.json` was saved with this model.\n"
    rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in sorted(r2_config.items()))
    return (
        "## R2 settings\n\nTrained with R2-Loss (`task_loss + lambda * R(W)`), which restricts the range of the "
        "weights so that they quantize to few bits. The settings, as saved in `r2_config.json`:\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


def stats_section(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "## Weight ranges\n\nNo `r2_stats.json` was saved with this model.\n"
    out = ["## Weight ranges\n", "Measured on the saved weights of the layers R2 acts on (`r2_stats.json`)."]
    overall = stats.get("overall") or {}
    if overall:
        out.append("\n| overall | value |\n|---|---|")
        out += [f"| `{k}` | {format_number(v)} |" for k, v in overall.items()]
    per_layer = stats.get("per_layer") or {}
    if per_layer:
        names = list(per_layer)
        if len(names) > _MAX_LAYER_ROWS:
            names = sorted(names, key=lambda n: -float(per_layer[n].get("max_over_std") or 0))[:_MAX_LAYER_ROWS]
            out.append(f"\nThe {_MAX_LAYER_ROWS} layers (of {len(per_layer)}) with the largest max/std:")
        out.append("\n| layer | min | max | std | max/std | kurtosis |\n|---|---|---|---|---|---|")
        for name in names:
            s = per_layer[name]
            cells = [format_number(s.get(k)) for k in ("min", "max", "std", "max_over_std", "kurtosis")]
            out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def usage_section(library: str, repo_id: str, low_bit: bool = False) -> str:
    """`## How to load`: with its own library (a timm model also with transformers' `TimmWrapper`), and with hf-r2,
    which also returns the R2 settings and weight ranges; a low-bit export with hf-r2 only."""
    if low_bit:
        return (
            "## How to load\n\n"
            "The weights are stored as low-bit codes (`low_bit.safetensors`, described by `low_bit_config.json`); "
            "hf-r2 decodes them into the timm / transformers architecture in `config.json`:\n\n"
            f'```python\nimport hf_r2\nmodel, r2_config, stats, low_bit = hf_r2.from_pretrained("{repo_id}")\n```\n'
        )
    auto = ("from transformers import AutoModelForImageClassification\n"
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}").eval()')
    if library == "timm":
        plain = (f'```python\nimport timm\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
                 "```\n\nOr with transformers (through its `TimmWrapperForImageClassification`), "
                 f"which returns the logits in `.logits`:\n\n```python\n{auto}\n```\n")
    else:
        plain = f"```python\n{auto}\n```\n"
    return (
        f"## How to load\n\n{plain}\n"
        "With hf-r2, which also returns the R2 settings and the weight-range statistics:\n\n"
        f'```python\nimport hf_r2\nmodel, r2_config, stats, _ = hf_r2.from_pretrained("{repo_id}")\n```\n'
    )


def training_section(training: dict[str, Any] | None) -> str:
    """`## Training`: the hyperparameters that matter (`r2_training.json`, or those given); `""` when none."""
    if not training:
        return ""
    rows = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in training.items())
    return f"## Training\n\n| hyperparameter | value |\n|---|---|\n{rows}\n"


def license_section(license: str | None, source: str | None) -> str:
    """`## License`: the license of the weights and where it comes from, or that none was given."""
    if not license:
        return ("## License\n\nNone given: no license was passed (`hf-r2 push --license`) and the model's config "
                "names none.\n")
    if source == "given":
        return f"## License\n\n`{license}`.\n"
    return (f"## License\n\n`{license}`: the license {source} names for these weights' architecture and "
            "pretrained weights (no `--license` was given; `hf-r2 push --license` sets another).\n")
