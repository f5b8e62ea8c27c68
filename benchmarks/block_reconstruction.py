"""Round-to-nearest against AdaRound against block reconstruction (BRECQ, and QDrop with `drop_prob=0.5`) on one
trained model: top-1 and seconds per row, at W2A8 and W2A4 (per-channel MSE weight grids, MSE activation ranges,
first and last layer at 8 bits, batch norms kept as trained for every row, so that only the rounding and the
activation steps differ).

A measurement, not a test: the model is a folder saved by `hf-r2 train` (by default the demo's resnet10t
baseline, `make demo`), evaluated on the first `--eval-samples` images of the test split (seeded shuffle), with
`--calibration-samples` training images (evaluation transform) for every method. `--iters` is the number of Adam
steps per layer (AdaRound) and per block (BRECQ / QDrop); the papers use 20,000 on a GPU.

The local CIFAR-10 copy is found through `$HF_R2_DATA_DIR` (the Makefile sets it to `../shared/data`).

    python benchmarks/block_reconstruction.py                       # the demo baseline, 200 steps
    python benchmarks/block_reconstruction.py --iters 1000 --settings W2A4 --model-dir outputs/.../seed0
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import time

_DEMO_MODEL = os.path.join("outputs", "demo", "runs", "resnet10t", "baseline", "seed0")
_METHODS = ("nearest", "adaround", "brecq", "qdrop")


def _config(method: str, w_bits: int, a_bits: int, args: argparse.Namespace):
    from hf_r2.quant import BlockReconstructionConfig, PTQConfig

    batches = -(-args.calibration_samples // args.batch_size)
    if method in ("nearest", "adaround"):
        return PTQConfig(w_bits=w_bits, a_bits=a_bits, bn="keep", rounding=method, calibration_batches=batches,
                         adaround={"iters": args.iters, "seed": args.seed})
    return BlockReconstructionConfig(w_bits=w_bits, a_bits=a_bits, iters=args.iters, calibration_batches=batches,
                                     drop_prob=0.5 if method == "qdrop" else 0.0, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=_DEMO_MODEL, help="A folder saved by `hf-r2 train`.")
    parser.add_argument("--dataset", default="cifar10", help="hf_r2.data.load_image_dataset name or path.")
    parser.add_argument("--settings", nargs="+", default=["W2A8", "W2A4"], help="WxAy settings.")
    parser.add_argument("--methods", nargs="+", default=list(_METHODS), choices=_METHODS)
    parser.add_argument("--iters", type=int, default=200, help="Adam steps per layer / block.")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="Calibration batch size.")
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"--model-dir {args.model_dir!r} has no config.json: run `make demo` or pass a trained folder.")
    settings = []
    for s in args.settings:
        match = re.fullmatch(r"W(\d)A(\d)", s)
        if not match:
            parser.error(f"--settings takes WxAy (e.g. W2A4), got {s!r}.")
        settings.append((int(match[1]), int(match[2])))

    import torch

    from hf_r2.data import calibration_batches, collate_fn, load_image_dataset, with_transforms
    from hf_r2.metrics import evaluate_accuracy
    from hf_r2.models import create_model
    from hf_r2.quant import quantize_

    if args.threads:
        torch.set_num_threads(args.threads)
    float_model = create_model(args.model_dir, pretrained=True).eval()
    ds = load_image_dataset(args.dataset, max_eval_samples=args.eval_samples, seed=args.seed)
    evaluation = list(torch.utils.data.DataLoader(with_transforms(ds["test"], float_model, train=False),
                                                  batch_size=250, collate_fn=collate_fn))
    calibration = calibration_batches(ds["train"], float_model, args.calibration_samples, seed=args.seed,
                                      batch_size=args.batch_size)
    print(f"model {args.model_dir}: float top-1 {100 * evaluate_accuracy(float_model, evaluation)['accuracy']:.2f} "
          f"on {len(ds['test'])} test images; {args.calibration_samples} calibration images, {args.iters} steps, "
          f"{torch.get_num_threads()} threads\n")
    print("| setting | method | top-1 | seconds |\n|---|---|---|---|")
    for w_bits, a_bits in settings:
        for method in args.methods:
            torch.manual_seed(args.seed)
            model = copy.deepcopy(float_model)
            start = time.perf_counter()
            quantize_(model, _config(method, w_bits, a_bits, args), calibration)
            seconds = time.perf_counter() - start
            top1 = 100 * evaluate_accuracy(model, evaluation)["accuracy"]
            print(f"| W{w_bits}A{a_bits} | {method} | {top1:.2f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
