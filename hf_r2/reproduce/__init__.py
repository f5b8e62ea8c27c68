"""`hf-r2 reproduce PRESET|CONFIG.yaml`: the paper's claim side by side, baseline and R2 variants trained alike, then
every low-bit result measured on each, in one resumable run.

Paper: "R2 Loss: Range Restriction Loss for Model Compression and Quantization", Kundu et al., 2023
(https://huggingface.co/papers/2303.08253). Its claim: a model trained with R2-Loss keeps more of its float accuracy
once quantized or palettized to 1 to 4 bits than the same model trained with ordinary weight decay alone.

What one [`ReproduceConfig`] runs:

1. **Trainings.** Every model x variant x seed with [`~hf_r2.R2Trainer`]: the same data, recipe (`optimizer`
   AdamW or SGD, cosine, `weight_decay`, per-model `recipes`, augmentation) and seed for every variant; the
   `baseline` variant is `r2_lambda=0` (ordinary weight decay only), or a folder trained elsewhere (`baselines`,
   copied and checked against the config). Fine-tune variants (`init_from: baseline`, their own `epochs` / `lr`)
   start from the model's baseline, and a same-length fine-tune without R2 is their control (`compare_to`). Lambda
   sweeps train a variant at each lambda on the first seed. Each training is saved in
   `output_dir/runs/<model>/<variant>/seed<k>/` ([`~hf_r2.models.create_model`] loads it back). With a
   `validation_size`, the trainings use the rest of the training split and log the validation top-1 per epoch.
2. **Low-bit rows.** For each trained model: FP top-1 and every configured low-bit setting, each on a copy of the
   float model: PTQ ([`~hf_r2.quant.quantize_`], BN re-estimated), QAT ([`~hf_r2.quant.prepare_qat`] + a fixed
   fine-tune), k-means ([`~hf_r2.quant.palettize_`], BN re-estimated) and DKM ([`~hf_r2.quant.prepare_dkm`] + the
   same fine-tune + [`~hf_r2.quant.finalize_dkm`], BN re-estimated). *Headline* settings run on every seed, the
   others on the first seed only; the sweep's trainings run the sweep's settings.
   With a validation split, every row is measured on it too (`val_accuracy`).
3. **Report.** `results.json` (every number per seed, mean and std over seeds for the headline rows, on the test
   and the validation split), `results.md` (one table per model: rows = settings, columns = variants; R2 minus its
   reference against the paper's gains, [`PAPER_TARGETS`]; the lambda sweeps and the lambda each chooses on the
   validation split; time, seeds, data) and PNG plots ([`hf_r2.plots`]): weight histograms and per-layer ranges,
   baseline vs R2, accuracy against bits, and the validation curves.

First and last layer: every low-bit row keeps the first conv and the classifier at 8 bits, as the paper's
baselines do: PTQ and QAT through `first_last_bits=8`, k-means and DKM by a 256-entry palette on those two layers.
The QAT and DKM fine-tunes are the same for every variant and run without R2, so the columns differ by their
trained weights only. Calibration and BN re-estimation use `calibration_samples` training images (evaluation
transform); the data subsets are drawn with `data_seed`, so every seed and variant sees the same images.

Resuming: a training is done when its folder holds `reproduce_run.json` (written last); a rerun skips it, and
retrains a folder without it (an interrupted training). A folder trained with other settings is an error, not
silently reused. Each low-bit row is cached in the run folder's `low_bit_results.json` with the settings that
produced it and reused while they match, so an interrupted run continues where it stopped.

The package: `variants` (the variants and low-bit settings: defaults, normalisers, names, [`quant_config`]),
`config` ([`ReproduceConfig`], file names), `presets` (the demo's, and [`CONFIG_PRESETS`]: the YAML configs shipped
in `configs/`, loaded by name or path with [`load_config`]), `apply` ([`apply_low_bit_`]: one low-bit
config applied to a float model, with the fine-tune QAT / DKM need; shared with `hf-r2 ptq / qat / compress` and
`benchmarks/quant_toolkit.py`), `plan` (which trainings and rows, and the cache specs), `pipeline` (data,
trainings, measured rows, [`run_reproduce`]), `summary` (mean / std over seeds, gains), `sweep` (lambda sweeps and
their validation rule) and `report` ([`assemble_results`], [`format_report`], plots). The `hf-r2 reproduce`
command is in `hf_r2.commands.reproduce`.

```bash
hf-r2 reproduce tiny             # seconds: a smoke run of the whole pipeline (configs/reproduce_tiny.yaml)
hf-r2 reproduce paper            # about two hours in one process (make reproduce: one hour)
hf-r2 reproduce my_config.yaml   # any file of ReproduceConfig fields; hf-r2 reproduce --help lists the presets
```
"""

from .apply import apply_low_bit_ as apply_low_bit_
from .apply import apply_setting as apply_setting
from .config import REPORT_NAME as REPORT_NAME
from .config import REPRODUCE_CONFIG_NAME as REPRODUCE_CONFIG_NAME
from .config import RESULTS_NAME as RESULTS_NAME
from .config import RUN_INFO_NAME as RUN_INFO_NAME
from .config import ReproduceConfig as ReproduceConfig
from .presets import CONFIG_PRESETS as CONFIG_PRESETS
from .presets import load_config as load_config
from .report import assemble_results as assemble_results
from .report import format_report as format_report
from .summary import PAPER_TARGETS as PAPER_TARGETS
from .variants import DEFAULT_LOW_BIT as DEFAULT_LOW_BIT
from .variants import DEFAULT_VARIANTS as DEFAULT_VARIANTS
from .variants import LowBitMethod as LowBitMethod
from .variants import quant_config as quant_config

__all__ = [
    "ReproduceConfig",
    "CONFIG_PRESETS",
    "load_config",
    "LowBitMethod",
    "REPRODUCE_CONFIG_NAME",
    "RUN_INFO_NAME",
    "RESULTS_NAME",
    "REPORT_NAME",
    "DEFAULT_VARIANTS",
    "DEFAULT_LOW_BIT",
    "run_reproduce",
    "assemble_results",
    "format_report",
    "PAPER_TARGETS",
    "quant_config",
    "apply_low_bit_",
    "apply_setting",
]


def __getattr__(name: str):
    # `run_reproduce` is imported on first use: `hf-r2 demo --help` (which reads the demo's defaults from this
    # package) then loads no training code, nor what it imports (transformers, torch)
    if name == "run_reproduce":
        from .pipeline import run_reproduce

        return run_reproduce
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
