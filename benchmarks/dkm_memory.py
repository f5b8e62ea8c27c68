"""Peak memory and time of one DKM training step on the CPU, against the same step without DKM.

For timm `resnet18` (`num_classes=10`), each input size and each variant, one training step (forward,
cross-entropy, backward, `torch.optim.SGD` step, gradients set to `None` before it) is measured in its own
subprocess:

- `none`: the plain model;
- `dkm`: [`hf_r2.quant.prepare_dkm`] (2 bits, one palette per tensor, the default 3 iterations), whose autograd
  Functions keep no `n x K` tensor and recompute the attention in chunks;
- `naive`: the same parametrization running the plain-autograd reference (`_dkm_reference`), which keeps every
  `n x K` intermediate of every iteration until the backward pass.

Memory is the growth of the process' resident set over the step: after a warm-up step the peak is reset
(`/proc/self/clear_refs`), freed heap is handed back (`malloc_trim`), and the step's peak (`VmHWM`) minus the
resident size just before it is reported. With `--allocator exact` (the default) allocations of 128 KiB and more
are mmap'ed (`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072`), so a freed tensor leaves the resident set at
once and the peak tracks live tensor memory (what a GPU caching allocator would hold); the extra page faults slow
every variant's step down. `--allocator default` keeps glibc's own settings: what a CPU user sees, freed memory
that glibc keeps in its heap included. Times are medians over `--repeats` steps (the measured one first). The
naive variant only runs at `--naive-sizes` (its extra memory does not depend on the input, and its steps take
tens of seconds). Linux only.

    python benchmarks/dkm_memory.py                      # 32x32 batch 8 and 224x224 batch 2
    python benchmarks/dkm_memory.py --allocator default --sizes 64x8 --variants none,dkm --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _peak_memory import ALLOCATORS, peak_kib, reset_peak, run_json_worker

__all__ = ["main"]

_VARIANTS = ("none", "dkm", "naive")


def _worker(variant: str, size: int, batch: int, bits: int, repeats: int) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    from hf_r2.quant.cluster.dkm import DKMParametrization, prepare_dkm
    from hf_r2.quant.cluster.palettize import PalettizeConfig

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    if variant != "none":
        prepare_dkm(model, PalettizeConfig(bits=bits, method="dkm"))
        for module in model.modules():
            if isinstance(module, DKMParametrization):
                module._use_reference = variant == "naive"
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))

    def step() -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the next step starts without gradients, as this one did
        return time.perf_counter() - t0

    step()  # warm-up: lazy initialisations, allocator state
    before = reset_peak()
    first = step()
    peak = peak_kib()
    times = [first] + [step() for _ in range(repeats - 1)]
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "parametrizations")) or sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    )
    return {
        "variant": variant,
        "size": size,
        "batch": batch,
        "growth_mib": (peak - before) / 1024,
        "rss_before_mib": before / 1024,
        "step_s": statistics.median(times),
        "clustered_weights": weights,
        "threads": torch.get_num_threads(),
    }


def _run(variant: str, size: int, batch: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--sizes", f"{size}x{batch}"]
    cmd += ["--bits", str(args.bits), "--repeats", str(args.repeats)]
    return run_json_worker(cmd, threads=args.threads, allocator=args.allocator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32x8,224x2", help="comma-separated RESOLUTIONxBATCH (default 32x8,224x2)")
    parser.add_argument("--variants", default=",".join(_VARIANTS), help="subset of none,dkm,naive")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="steps timed per variant (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="exact", help="see the module docstring")
    parser.add_argument("--naive-sizes", default="32x8", help="sizes at which the naive variant runs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    if args.worker:
        ((size, batch),) = sizes
        print(json.dumps(_worker(args.worker, size, batch, args.bits, args.repeats)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(_VARIANTS)}")
    naive_sizes = {tuple(int(v) for v in s.lower().split("x")) for s in args.naive_sizes.split(",") if s}
    print(
        f"resnet18, num_classes=10, {args.bits}-bit DKM per tensor, {args.threads} thread(s), allocator "
        f"{args.allocator}; load {tuple(round(v, 2) for v in os.getloadavg())}"
    )
    print(f"{'input':>10} {'variant':>7} {'peak growth MiB':>16} {'x none':>7} {'step s':>8} {'x none':>7}")
    for size, batch in sizes:
        base = None
        for variant in variants:
            if variant == "naive" and (size, batch) not in naive_sizes:
                continue
            r = _run(variant, size, batch, args)
            if variant == "none":
                base = r
            mem = f"{r['growth_mib'] / base['growth_mib']:.2f}" if base else "-"
            tim = f"{r['step_s'] / base['step_s']:.1f}" if base else "-"
            print(
                f"{f'{size}x{size}x{batch}':>10} {variant:>7} {r['growth_mib']:16.1f} {mem:>7} "
                f"{r['step_s']:8.3f} {tim:>7}",
                flush=True,
            )
    print(f"load after: {tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
