"""Train an image classifier with R2-Loss in a plain 🤗 Accelerate loop ([`hf_r2.loop.train_with_accelerate`]).

One process (CPU or GPU):

    accelerate launch examples/train_accelerate.py --model resnet18 --dataset cifar10-small --input_size 32 \\
        --num_epochs 10 --per_device_batch_size 64 --learning_rate 0.05 --weight_decay 5e-4 \\
        --loss margin --r2_lambda 0.01 --output_dir outputs/resnet18-r2

Several GPUs: `accelerate launch --multi_gpu --num_processes 4 examples/train_accelerate.py ...`; the global batch
is `per_device_batch_size x num_processes x gradient_accumulation_steps`. Two CPU processes (DDP over gloo):
`accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --use_cpu ...`
(`accelerate launch --cpu --num_processes 2` starts only one process).

The flags are the fields of `ModelArguments` and `DataArguments` (as in `hf-r2 train`), [`LoopConfig`] and
[`R2Config`]; `--help` lists them. The trained model goes to `<output_dir>/model` (loadable with
`hf_r2.models.create_model(path, pretrained=True)`), with `r2_config.json` and `r2_stats.json`; resumable
checkpoints go to `<output_dir>/checkpoints/step_<n>` with `--checkpointing_steps N`, and
`--resume_from_checkpoint latest` continues from the newest. Ctrl-C, or SIGTERM (what a cluster scheduler sends),
stops it with one line naming the last complete checkpoint, and status 130 (143 for SIGTERM).
"""

from __future__ import annotations

import json
import os
import sys

from accelerate import PartialState
from accelerate.utils import set_seed
from transformers import HfArgumentParser

from hf_r2.checkpoints import CheckpointError, interrupt_exit_code, sigterm_as_interrupt
from hf_r2.config import R2Config
from hf_r2.data import (
    DataArguments,
    ModelArguments,
    collate_fn,
    label_names,
    load_data,
    record_data_config,
    with_transforms,
)
from hf_r2.loop import train_with_accelerate
from hf_r2.loop_config import LoopConfig
from hf_r2.models import create_model


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, LoopConfig, R2Config))
    try:
        model_args, data_args, config, r2_config = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a config's __post_init__ rejected a value
        parser.error(str(err))

    # Every process builds the same model from the same seed; the main process prepares the data first, the
    # others then read it from the cache.
    state = PartialState(cpu=config.use_cpu)
    set_seed(config.seed)
    with state.main_process_first():
        ds = load_data(data_args, seed=config.seed)
    model = create_model(model_args.model_name_or_path, pretrained=model_args.pretrained, label_names=label_names(ds))
    record_data_config(model, data_args)
    transform = {"input_size": data_args.input_size, "augment": data_args.augment}

    metrics = train_with_accelerate(
        model,
        with_transforms(ds["train"], model, train=True, **transform),
        with_transforms(ds["test"], model, train=False, **transform),
        r2_config=r2_config,
        config=config,
        collate_fn=collate_fn,
    )
    if state.is_main_process:
        print(json.dumps(metrics, indent=2))
        if config.save_model:
            print(f"Saved the model to {os.path.join(config.output_dir, 'model')}")
    return metrics


if __name__ == "__main__":
    try:
        with sigterm_as_interrupt():  # also while the data loads
            main(sys.argv[1:])
    except KeyboardInterrupt as err:  # the loop has said where to resume
        raise SystemExit(interrupt_exit_code(err)) from None
    except CheckpointError as err:  # a checkpoint refused: incomplete, or holding more than tensors and plain values
        raise SystemExit(f"train_accelerate.py: error: {err}") from None
