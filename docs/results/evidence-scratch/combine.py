"""R2 from scratch against the baselines: joins this folder's report with the baselines' (`../evidence/`).

The from-scratch trainings ran without the baselines in their cache (a new machine had lost them), so their report
has no baseline column. This script puts the seed-0 baselines of `docs/results/evidence/results.json` (the same
recipe, data split and seed, without R2) beside every from-scratch run of `results.json` here (and of the MobileNetV2
lambda-3 run, which is in the baselines' report), chooses each model's lambda with the library's own rule
(`hf_r2.reproduce.sweep.choose_lambda`, on the validation split only), prints the markdown table of
`README.md` and draws `plots/<model>_validation_vs_baseline.png` (validation top-1 per epoch).

    python docs/results/evidence-scratch/combine.py
"""

from __future__ import annotations

import json
import os

from hf_r2.plots import plot_curves
from hf_r2.reproduce.sweep import choose_lambda

HERE = os.path.dirname(os.path.abspath(__file__))
SWEPT = ["W2A8 per-tensor maxabs", "W2A8 per-channel mse", "W1 k-means"]
COLUMNS = ["FP", *SWEPT, "W2A2 per-channel mse", "W2A2 QAT"]


def load(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["runs"]


def main() -> None:
    base_runs = load(os.path.join(HERE, "..", "evidence", "results.json"))
    scratch = [r for r in load(os.path.join(HERE, "results.json")) if r["seed"] == 0]
    scratch += [r for r in base_runs if r["variant"]["name"].startswith("linf_scratch")
                and not any(s["model"] == r["model"] and s["variant"]["weight"] == r["variant"]["weight"]
                            for s in scratch)]
    print("| model | lambda | " + " | ".join(COLUMNS) + " | mean max/std, kurtosis | train s |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for model in sorted({r["model"] for r in scratch}):
        base = next(r for r in base_runs if r["model"] == model and r["variant"]["name"] == "baseline"
                    and r["seed"] == 0)
        runs = sorted((r for r in scratch if r["model"] == model), key=lambda r: r["variant"]["weight"])

        def row(run: dict, lam: float) -> dict:
            return {"lambda": lam, "variant": run["variant"]["name"],
                    "val_accuracy": {c: run["rows"][c]["val_accuracy"] for c in ["FP", *SWEPT]}}

        chosen = choose_lambda([row(base, 0.0), *(row(r, r["variant"]["weight"]) for r in runs)], SWEPT)
        for run in [base, *runs]:
            lam = run["variant"]["weight"]
            cells = []
            for c in COLUMNS:
                if c not in run["rows"]:
                    cells.append("-")
                    continue
                acc, val = 100 * run["rows"][c]["accuracy"], 100 * run["rows"][c].get("val_accuracy", float("nan"))
                if run is base or c not in base["rows"]:
                    cells.append(f"{acc:.2f} (val {val:.2f})")
                else:
                    cells.append(f"{acc:.2f} ({acc - 100 * base['rows'][c]['accuracy']:+.2f}; val {val:.2f})")
            stats = run["stats"]["overall"]
            name = "baseline" if run is base else f"{lam:g}" + (" (chosen)" if chosen and chosen["lambda"] == lam
                                                                 else "")
            seconds = f"{run['train_seconds']:.0f}" if run is not base else "(its own stage)"
            print(f"| {model} | {name} | " + " | ".join(cells)
                  + f" | {stats['mean_max_over_std']:.2f}, {stats['mean_kurtosis']:.2f} | {seconds} |")
        print(f"<!-- {model}: chosen {chosen} -->")
        plot(model, base, runs)


def plot(model: str, base: dict, runs: list[dict]) -> None:
    curves = {"baseline (no R2)": base["val_curve"],
              **{f"L-inf from scratch, lambda {r['variant']['weight']:g}": r["val_curve"] for r in runs}}
    plot_curves({label: {int(e): 100 * a for e, a in curve.items()} for label, curve in curves.items()},
                os.path.join(HERE, "plots", f"{model}_validation_vs_baseline.png"),
                title=f"{model}: R2 from scratch, validation split")


if __name__ == "__main__":
    main()
