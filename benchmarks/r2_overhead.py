"""How much R2-Loss adds to a training step, on the CPU.

For each model, loss and granularity (per tensor / per channel) it prints:

- `r2/sgd`: the time of `R2Regularizer` forward + backward over all target weights, over the time of one
  `torch.optim.SGD(momentum=0.9, foreach=True)` step over the same weights (whose `.grad` already exists);
- `naive/sgd`: the same for a plain per-layer loop of the [`hf_r2.losses`] functions under autograd;
- `step`: the whole training-step time (forward, cross-entropy + lambda * R2, backward, SGD step over all
  parameters) with R2, over the same step without R2.

Each ratio is printed beside its target (issue "Close to the floor everywhere"): R2 forward + backward at most
1.0x the SGD step for L-inf and Margin, 2.0x for Soft-Min-Max and KURE; a whole step with R2 at most 1.02x the step
without; `met` / `MISSED`.

Timings are medians of interleaved repetitions (the two things compared alternate in one loop), so that a
load change on the machine hits both alike. Margin and Soft-Min-Max are measured in two states: `init`
(as constructed: margins at `max |w|`, so no weight has an excess) and `trained` (margins shrunk by 10 %,
`log_alpha` lowered by 0.3, as after some training).

On the CPU, R2's dense gradients are fresh weight-sized buffers each step, and glibc hands freed big chunks
back to the OS, so every step page-faults them in again (SGD allocates nothing). For resnet18 this was most
of R2's time; `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296`
(or jemalloc/tcmalloc, as PyTorch's CPU tuning guide advises) keeps the pages and shows the rest.

    python benchmarks/r2_overhead.py --threads 1
    python benchmarks/r2_overhead.py --quick --models mobilenetv2_100 --losses linf,margin
    python benchmarks/r2_overhead.py --device cuda --no-naive     # on a GPU (see benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_r2 import R2Config, R2Regularizer, losses  # noqa: E402
from hf_r2._r2_kernels import SMM_TAIL  # noqa: E402  (the kernel's own truncation: the floor follows it)

__all__ = ["main"]


#: Targets of R2 forward + backward over one SGD step, per loss; and of a whole training step with R2 over without.
R2_TARGETS = {"linf": 1.0, "margin": 1.0, "soft_min_max": 2.0, "kurtosis": 2.0}
STEP_TARGET = 1.02


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "MISSED"


#: Waits for the device's queued work before a clock is read (`torch.cuda.synchronize` on a GPU; see `--device`).
_sync = lambda: None  # noqa: E731


def _interleaved(fa, fb, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of `fa` and `fb`, run alternately."""
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fa()
        _sync()
        t1 = time.perf_counter()
        fb()
        _sync()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def _set_state(reg: R2Regularizer, state: str) -> None:
    if state != "trained":
        return
    with torch.no_grad():
        if hasattr(reg, "margin"):
            reg.margin.mul_(0.9)
        if hasattr(reg, "log_alpha"):
            reg.log_alpha.sub_(0.3)


def _naive_total(reg: R2Regularizer) -> torch.Tensor:
    """`sum_l R(W_l)` as a plain loop of the functional losses (the reference this package speeds up)."""
    c, total, offset = reg.config, 0.0, 0
    for w in reg.weights():
        k = w.shape[0] if c.per_channel else 1
        if c.loss == "linf":
            total = total + losses.linf_r2(w, c.per_channel)
        elif c.loss == "margin":
            m = reg.margin[offset : offset + k]
            total = total + losses.margin_r2(w, m if c.per_channel else m.reshape(()), c.margin_penalty)
        elif c.loss == "soft_min_max":
            a = reg.log_alpha[offset : offset + k].exp()
            total = total + losses.soft_min_max_r2(w, a if c.per_channel else a.reshape(()), c.soft_min_max_penalty)
        else:
            total = total + losses.kurtosis_r2(w, c.kurtosis_target, c.per_channel)
        offset += k
    return total


def _overhead(
    model, loss: str, per_channel: bool, state: str, repeats: int, naive: bool, floor: bool
) -> tuple[float, ...]:
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=per_channel))
    _set_state(reg, state)
    weights = reg.weights()
    for w in weights:
        w.grad = torch.randn_like(w) * 1e-3
    sgd = torch.optim.SGD(weights, lr=1e-12, momentum=0.9, foreach=True)  # tiny lr: the state stays put

    def r2_step():
        reg().backward()

    def naive_step():
        _naive_total(reg).backward()

    t_sgd, t_r2 = _interleaved(sgd.step, r2_step, repeats)
    ratio_naive = float("nan")
    if naive:
        t_sgd2, t_naive = _interleaved(sgd.step, naive_step, max(3, repeats // 3))
        ratio_naive = t_naive / t_sgd2
    extra = ""
    if floor and loss == "soft_min_max":
        t_floor, frac = _smm_floor(reg, repeats)
        extra = (f"  floor {t_floor * 1e3:.2f} ms = {t_floor / t_sgd:.2f}x sgd ({frac:.2%} of weights within reach); "
                 f"kernel {t_r2 / t_floor:.1f}x the floor; where the time goes:\n{_profile(reg)}")
    for w in weights:
        w.grad = None
    return t_sgd, t_r2, t_r2 / t_sgd, ratio_naive, extra


def _smm_floor(reg: R2Regularizer, repeats: int) -> tuple[float, float]:
    """The Soft-Min-Max floor: one read pass over every weight, plus two exponentials and one gradient write for
    each weight within `(ln n + 24) / alpha` of its extreme (the only ones that count at float32 precision).
    Returns (floor seconds, fraction of weights within reach), timed with the same primitives the kernel uses."""
    per_channel = reg.config.per_channel
    alpha, offset, near = reg.log_alpha.detach().exp(), 0, 0
    weights = [w.detach() for w in reg.weights()]
    for w in weights:
        rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        a = alpha[offset : offset + rows.shape[0]][:, None]
        offset += rows.shape[0]
        reach = (math.log(rows.shape[1]) + SMM_TAIL) / a
        hi, lo = rows.amax(1, keepdim=True), rows.amin(1, keepdim=True)
        near += int(((rows >= hi - reach) | (rows <= lo + reach)).sum())
    total = sum(w.numel() for w in weights)
    sample = torch.randn(max(near, 1))
    out = torch.empty_like(sample)

    def read():
        torch._foreach_max(weights)

    def near_work():  # two exponentials and one gradient write per weight within reach
        torch.exp(sample, out=out)
        torch.exp(sample, out=out)
        out.copy_(sample)

    t_read, t_near = _interleaved(read, near_work, repeats)
    return t_read + t_near, near / total


def _profile(reg: R2Regularizer, rows: int = 8) -> str:
    """The kernel's top operations by self CPU time over 5 forward + backward passes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        reg().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            reg().backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"    {'op':34s} {'ms/step':>8s} {'share':>6s} {'calls/step':>10s}"]
    for e in events[:rows]:
        lines.append(f"    {e.key[:34]:34s} {e.self_cpu_time_total / 5e3:8.2f} {e.self_cpu_time_total / total:6.1%} "
                     f"{e.count / 5:10.0f}")
    return "\n".join(lines)


def _step_ratio(model, loss: str, per_channel: bool, batch: int, size: int, repeats: int) -> tuple[float, float]:
    reg = R2Regularizer(model, R2Config(loss=loss, per_channel=per_channel, weight=1e-4))
    _set_state(reg, "trained")
    params = list(model.parameters()) + list(reg.parameters())
    opt = torch.optim.SGD(params, lr=1e-12, momentum=0.9, foreach=True)
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)

    def step(with_r2: bool):
        opt.zero_grad(set_to_none=True)
        out = F.cross_entropy(model(x), y)
        if with_r2:
            out = out + reg.weight_at(None) * reg()
        out.backward()
        opt.step()

    t_plain, t_r2 = _interleaved(lambda: step(False), lambda: step(True), repeats)
    return t_plain, t_r2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,mobilenetv2_100")
    p.add_argument("--losses", default="linf,margin,soft_min_max,kurtosis")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--step", default="32x32x32,224x224x8", help="training-step settings HxWxBATCH, comma-separated")
    p.add_argument("--no-naive", action="store_true", help="skip the naive per-layer loop")
    p.add_argument("--no-step", action="store_true", help="skip the whole-training-step ratios")
    p.add_argument("--quick", action="store_true", help="fewer repeats, 32x32 step only")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip Soft-Min-Max's floor analysis and profile table")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the floor analysis and profile are CPU-only)")
    args = p.parse_args(argv)
    global _sync
    device = torch.device(args.device)
    if device.type == "cuda":
        _sync = torch.cuda.synchronize
        args.floor = False
        print(f"device: {torch.cuda.get_device_name(device)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 7 if args.quick else args.repeats
    steps = ["32x32x32"] if args.quick else [s for s in args.step.split(",") if s]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, num_classes={args.num_classes}, "
          f"medians of {repeats} interleaved repeats, load average {os.getloadavg()[0]:.2f}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=args.num_classes).to(device)
        reg = R2Regularizer(model)
        n_w = sum(w.numel() for w in reg.weights())
        print(f"\n{name}: {len(reg.names)} target layers, {n_w / 1e6:.2f}M weights")
        print(f"{'loss':14s} {'mode':12s} {'state':8s} {'sgd ms':>8s} {'r2 ms':>8s} {'r2/sgd':>7s} {'target':>6s} "
              f"{'':6s} {'naive/sgd':>9s}")
        for loss in args.losses.split(","):
            states = ("init", "trained") if loss in ("margin", "soft_min_max") else ("-",)
            for per_channel in (False, True):
                for state in states:
                    t_sgd, t_r2, ratio, naive, extra = _overhead(
                        model, loss, per_channel, state, repeats, not args.no_naive, state != "init" and args.floor
                    )
                    mode = "per-channel" if per_channel else "per-tensor"
                    target = R2_TARGETS[loss]
                    print(f"{loss:14s} {mode:12s} {state:8s} {t_sgd * 1e3:8.2f} {t_r2 * 1e3:8.2f} {ratio:7.2f} "
                          f"{target:6.2f} {_verdict(ratio, target):6s} {naive:9.2f}", flush=True)
                    if extra:
                        print(extra, flush=True)
        if args.no_step:
            continue
        model.train()
        for setting in steps:
            h, w, b = (int(v) for v in setting.split("x"))
            for loss in args.losses.split(","):
                for per_channel in (False, True):
                    t_plain, t_r2 = _step_ratio(model, loss, per_channel, b, h, max(5, repeats // 2))
                    mode = "per-channel" if per_channel else "per-tensor"
                    print(
                        f"step {h}x{w} batch {b} {loss:14s} {mode:12s} (trained state): "
                        f"without {t_plain * 1e3:7.1f} ms, with {t_r2 * 1e3:7.1f} ms, ratio {t_r2 / t_plain:5.3f} "
                        f"(target {STEP_TARGET}: {_verdict(t_r2 / t_plain, STEP_TARGET)})",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
