"""Worker for the multi-process tests of `hf_r2.loop`, and the tiny model / data they share with the 1-process runs.

Launched by `tests/test_loop.py` as
`accelerate launch --multi_gpu --num_processes 2 ... tests/_loop_worker.py --out DIR`; every rank trains the same
tiny conv net (no batch norm) on its shard of a deterministic dataset and saves its final weights, R2 parameters
and metrics to `DIR/rank<r>.pt`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["TinyConvNet", "SyntheticImages", "build", "WORLD_BATCH"]

# global batch per optimizer step: 2 processes x 2 per device x 2 accumulation = 1 process x 8 per device
WORLD_BATCH = 8


class TinyConvNet(nn.Module):
    """Conv2d + ReLU + Linear, no normalisation layer: its gradient does not depend on how a batch is split."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class SyntheticImages(torch.utils.data.Dataset):
    """`n` fixed random 3 x size x size images with labels in `[0, num_classes)`, as `{"pixel_values", "labels"}`."""

    def __init__(self, n: int, seed: int, num_classes: int = 4, size: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def build(output_dir: str, per_device_batch_size: int, gradient_accumulation_steps: int):
    """Model, R2 regularizer, datasets and configs of the 2-process vs 1-process comparison."""
    from hf_r2.config import R2Config
    from hf_r2.loop_config import LoopConfig
    from hf_r2.regularizer import R2Regularizer

    torch.manual_seed(0)
    model = TinyConvNet()
    r2_config = R2Config(loss="margin", weight=0.5, warmup_steps=2)
    regularizer = R2Regularizer(model, r2_config)
    config = LoopConfig(
        output_dir=output_dir, num_epochs=2, per_device_batch_size=per_device_batch_size,
        per_device_eval_batch_size=3, gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=0.1, momentum=0.9, weight_decay=1e-3, lr_warmup_steps=1, logging_steps=1,
        use_cpu=True, save_model=False, seed=3,
    )
    return model, regularizer, SyntheticImages(32, seed=0), SyntheticImages(10, seed=1), config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from accelerate import PartialState

    from hf_r2.loop import train_with_accelerate

    torch.set_num_threads(1)
    model, regularizer, train_ds, eval_ds, config = build(args.out, per_device_batch_size=2,
                                                          gradient_accumulation_steps=2)
    metrics = train_with_accelerate(model, train_ds, eval_ds, regularizer=regularizer, config=config)
    state = PartialState()
    torch.save(
        {
            "num_processes": state.num_processes,
            "distributed_type": str(state.distributed_type),
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "r2": {k: v.detach().clone() for k, v in regularizer.state_dict().items()},
            "metrics": metrics,
        },
        os.path.join(args.out, f"rank{state.process_index}.pt"),
    )


if __name__ == "__main__":
    main()
