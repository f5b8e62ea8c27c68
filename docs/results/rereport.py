"""Rewrite a committed reproduce report from its results.json with the library's current scoring, training nothing.

The gains section (and the `gains` of results.json) is recomputed from the committed per-seed numbers with
`hf_r2.reproduce.summary.gains`, the one place that decides whether a paper claim is met (each claim on its own
method's rows, the float rule, retention); results.md is then formatted anew with `format_report`. Every measured
number stays as it was. The datasets of these folders are CIFAR-10 (10 classes), which older results.json files do
not record.

    python docs/results/rereport.py docs/results/evidence docs/results/evidence-scratch
"""

from __future__ import annotations

import json
import os
import sys

from hf_r2._utils import write_json_atomic, write_text_atomic
from hf_r2.reproduce import REPORT_NAME, RESULTS_NAME, ReproduceConfig, format_report
from hf_r2.reproduce.summary import gains

CLASSES = {"cifar10": 10, "cifar10-small": 10, "cifar10-tiny": 10}


def rereport(folder: str) -> None:
    path = os.path.join(folder, RESULTS_NAME)
    with open(path) as f:
        results = json.load(f)
    config = ReproduceConfig.from_dict(results["config"])
    results["data"].setdefault("num_classes", CLASSES.get(config.dataset))
    results["gains"] = gains(config, results["summary"])
    write_json_atomic(path, results)
    write_text_atomic(os.path.join(folder, REPORT_NAME), format_report(results))
    print(f"rewrote {path} (gains) and {os.path.join(folder, REPORT_NAME)}")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        rereport(folder)
