"""Hub scenarios of tests/test_hub.py, run in a subprocess whose environment (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME,
HF_TOKEN) is set before huggingface_hub is imported. Usage: `python _hub_worker.py SCENARIO WORK_DIR`; each scenario
writes `WORK_DIR/<scenario>.json` with what the test asserts on."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch

TIMM_REPO = "r2-tests/timm-resnet-r2"
HF_REPO = "r2-tests/convnext-r2"
TRAINER_REPO = "r2-tests/trainer-r2"
LOW_BIT_REPO = "r2-tests/timm-resnet-r2-w2a8"
CLI_REPO = "r2-tests/timm-resnet-r2-cli"
LOW_BIT_ACCURACY = 0.3125  # the number the low-bit export's low_bit_results.json holds
TRAINER_ACCURACY = 0.25
ACCURACY = 0.4375  # the measured number the timm folder's eval_results.json holds
DATASET = "uoft-cs/cifar10"
# recorded in the CLI folder's r2_training.json, never on a card
LOCAL_DATA = "/home/someone/private/data/cifar10-tiny"


def _folder_digest(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _models():
    import timm
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    timm_model = timm.create_model("test_resnet", num_classes=3).eval()
    timm_model.pretrained_cfg = {**timm_model.pretrained_cfg, "label_names": ["cat", "dog", "frog"]}
    cfg = ConvNextConfig(num_labels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2,
                         id2label={0: "cat", 1: "dog", 2: "frog"}, label2id={"cat": 0, "dog": 1, "frog": 2})
    hf_model = ConvNextForImageClassification(cfg).eval()
    return timm_model, hf_model


def push(work: str) -> dict:
    """Save both models (with R2 files and, for timm, a measured accuracy) and push them; keep reference logits."""
    import hf_r2
    import hf_r2.hub
    from hf_r2 import R2Config, R2Regularizer
    from hf_r2._utils import write_json_atomic

    timm_model, hf_model = _models()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = R2Config(loss="margin", weight=0.02)
    timm_dir, hf_dir = os.path.join(work, "timm_folder"), os.path.join(work, "hf_folder")
    hf_r2.save_model_folder(timm_model, timm_dir, r2_config=cfg, stats=R2Regularizer(timm_model, cfg).stats())
    write_json_atomic(os.path.join(timm_dir, "eval_results.json"), {"eval_accuracy": ACCURACY, "eval_loss": 1.1})
    urls = {"timm": hf_r2.hub.push_to_hub(timm_dir, TIMM_REPO, datasets=DATASET)}
    # transformers model: saved by push_to_hub itself, no eval results (so no metric on its card)
    urls["hf"] = hf_r2.hub.push_to_hub(hf_model, HF_REPO, hf_dir, r2_config=cfg,
                                       stats=R2Regularizer(hf_model, cfg).stats())
    # a W2A8 export of the timm model, pushed as its own repo with the full-precision repo as base model
    import copy

    import timm

    from hf_r2.quant import PTQConfig, quantize_, save_low_bit, update_results

    # (ten classes, so that `hf-r2 evaluate` can run it on CIFAR-10 in `load`)
    cifar_model = timm.create_model("test_resnet", num_classes=10).eval()
    quantized = quantize_(copy.deepcopy(cifar_model), PTQConfig(w_bits=2, a_bits=8, bn="keep"), [{"pixel_values": x}])
    low_dir = os.path.join(work, "low_bit_folder")
    save_low_bit(quantized, low_dir, method="ptq", base_model=TIMM_REPO)
    update_results(low_dir, [{"setting": "W2A8", "method": "ptq-nearest", "accuracy": LOW_BIT_ACCURACY}])
    urls["low_bit"] = hf_r2.hub.push_to_hub(low_dir, LOW_BIT_REPO, datasets=DATASET)
    with torch.no_grad():
        ref = {"x": x, "timm": timm_model(x), "hf": hf_model(pixel_values=x).logits, "low_bit": quantized.eval()(x)}
    torch.save(ref, os.path.join(work, "ref.pt"))
    out = {"urls": urls, "timm_files": sorted(os.listdir(timm_dir)), "hf_files": sorted(os.listdir(hf_dir)),
           "low_bit_files": sorted(os.listdir(low_dir))}
    try:
        hf_r2.hub.push_to_hub(timm_dir, TIMM_REPO, datasets=DATASET, exist_ok=False)
        out["exist_error"] = None
    except FileExistsError as err:
        out["exist_error"] = str(err)
    # `hf-r2 push` and its options, succeeding
    import contextlib
    import io
    import shutil

    from hf_r2.cli import main

    cli_dir = os.path.join(work, "cli_folder")  # a copy: the card it writes must not change timm_dir's
    shutil.copytree(timm_dir, cli_dir)
    from hf_r2.saving import update_training_info

    update_training_info(cli_dir, data={"dataset": "cifar10-tiny", "source": f"local copy {LOCAL_DATA}",
                                        "hub_id": None, "train_split": "train", "eval_split": "test",
                                        "train_images": 1000, "eval_images": 200, "input_size": 32})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out["cli_push_rc"] = main(["push", cli_dir, CLI_REPO, "--dataset", DATASET, "--base-model",
                                   "timm/resnet18.a1_in1k", "--license", "mit", "--commit-message", "cli push"])
    out["cli_push_stdout"] = printed.getvalue()
    out["cli_push_files_after"] = sorted(os.listdir(cli_dir))
    # the Trainer's own hub mechanism, with hf-r2's card
    from hf_r2 import R2Trainer, R2TrainingArguments

    args = R2TrainingArguments(output_dir=os.path.join(work, "trainer_out"), push_to_hub=True,
                               hub_model_id=TRAINER_REPO, report_to="none", use_cpu=True, r2_loss="linf")
    trainer = R2Trainer(timm_model, args)
    trainer.save_metrics("eval", {"eval_accuracy": TRAINER_ACCURACY})
    trainer.push_to_hub(dataset=DATASET)
    out["trainer_files"] = sorted(os.listdir(args.output_dir))
    return out


def load(work: str) -> dict:
    """In a fresh HF_HOME: plain timm, plain transformers and hf_r2.from_pretrained; the cards."""
    import timm
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageClassification

    import hf_r2.hub

    ref = torch.load(os.path.join(work, "ref.pt"))
    x = ref["x"]
    out: dict = {}
    with torch.no_grad():
        plain_timm = timm.create_model(f"hf-hub:{TIMM_REPO}", pretrained=True).eval()
        out["timm_plain_max_diff"] = (plain_timm(x) - ref["timm"]).abs().max().item()
        out["timm_plain_labels"] = plain_timm.pretrained_cfg.get("label_names")
        plain_hf = AutoModelForImageClassification.from_pretrained(HF_REPO).eval()
        out["hf_plain_max_diff"] = (plain_hf(pixel_values=x).logits - ref["hf"]).abs().max().item()
        out["hf_plain_id2label"] = {str(k): v for k, v in plain_hf.config.id2label.items()}
        timm_in_transformers = AutoModelForImageClassification.from_pretrained(TIMM_REPO).eval()
        out["timm_transformers_max_diff"] = (timm_in_transformers(x).logits - ref["timm"]).abs().max().item()
        out["timm_transformers_id2label"] = {str(k): v for k, v in timm_in_transformers.config.id2label.items()}
        model, r2_config, stats, _ = hf_r2.hub.from_pretrained(TIMM_REPO)
        out["timm_r2_max_diff"] = (model(x) - ref["timm"]).abs().max().item()
        out["timm_r2_config"] = r2_config.to_dict() if r2_config else None
        out["timm_r2_stats_keys"] = sorted(stats) if stats else None
        model, r2_config, stats, _ = hf_r2.hub.from_pretrained(HF_REPO)
        out["hf_r2_max_diff"] = (model(pixel_values=x).logits - ref["hf"]).abs().max().item()
        out["hf_r2_config"] = r2_config.to_dict() if r2_config else None
        out["hf_r2_stats_layers"] = sorted(stats["per_layer"]) if stats else None
        model, _, _, low_bit = hf_r2.hub.from_pretrained(LOW_BIT_REPO)
        out["low_bit_max_diff"] = (model(x) - ref["low_bit"]).abs().max().item()
        out["low_bit_method"] = low_bit["method"] if low_bit else None
        out["low_bit_weights_distinct"] = max(
            torch.unique(m.weight[c]).numel() for n, m in model.named_modules()
            if n in low_bit["layers"] and low_bit["layers"][n]["bits"] == 2 for c in range(m.weight.shape[0])
        )
    from hf_r2.cli import main

    # `hf-r2 evaluate` on a Hub id of a low-bit export (tiny local CIFAR-10), and on a model with too few classes
    data_dir = os.environ.get("HF_R2_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    eval_dir = os.path.join(work, "evaluate_low_bit")
    out["cli_evaluate_rc"] = main(["evaluate", LOW_BIT_REPO, "--dataset", "cifar10-tiny", "--data-dir", data_dir,
                                   "--input-size", "32", "--max-eval-samples", "16", "--output-dir", eval_dir])
    with open(os.path.join(eval_dir, "low_bit_results.json")) as f:
        out["cli_evaluate_rows"] = json.load(f)["rows"]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["cli_evaluate_classes_rc"] = main(["evaluate", TIMM_REPO, "--dataset", "cifar10-tiny", "--data-dir",
                                               data_dir, "--input-size", "32", "--max-eval-samples", "16"])
    out["cli_evaluate_classes_err"] = err.getvalue()
    local = os.path.join(work, "downloaded")
    out["cli_download_rc"] = main(["download", HF_REPO, "--local-dir", local])
    out["cli_download_files"] = sorted(f for f in os.listdir(local) if not f.startswith("."))
    # `hf-r2 download --revision`: the commit the first push made, and a revision that does not exist
    first_commit = json.load(open(os.path.join(work, "push.json")))["urls"]["timm"].rstrip("/").split("/")[-1]
    at_commit = os.path.join(work, "downloaded_at_commit")
    out["cli_download_revision_rc"] = main(["download", TIMM_REPO, "--local-dir", at_commit, "--revision",
                                            first_commit])
    out["cli_download_revision_files"] = sorted(f for f in os.listdir(at_commit) if not f.startswith("."))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out["cli_download_bad_revision_rc"] = main(["download", TIMM_REPO, "--local-dir", at_commit + "-bad",
                                                    "--revision", "no-such-branch"])
    out["cli_download_bad_revision_err"] = err.getvalue()
    for key, repo in (("timm_card", TIMM_REPO), ("hf_card", HF_REPO), ("trainer_card", TRAINER_REPO),
                      ("low_bit_card", LOW_BIT_REPO), ("cli_card", CLI_REPO)):
        card = ModelCard.load(repo)
        out[key] = {"data": card.data.to_dict(), "text": card.text}
    return out


def offline(work: str) -> dict:
    """HF_HUB_OFFLINE=1 (and the endpoint a closed port): load from the cache that `load` filled."""
    import hf_r2.hub

    ref = torch.load(os.path.join(work, "ref.pt"))
    model, r2_config, stats, _ = hf_r2.hub.from_pretrained(TIMM_REPO)
    with torch.no_grad():
        diff = (model(ref["x"]) - ref["timm"]).abs().max().item()
    return {"max_diff": diff, "r2_loss": r2_config.loss if r2_config else None, "has_stats": stats is not None}


def fail(work: str) -> dict:
    """The endpoint is a closed port: the push fails fast, clearly, and leaves the folder whole; then no token."""
    import hf_r2.hub

    folder = os.path.join(work, "timm_folder")
    out: dict = {}
    before = _folder_digest(folder)
    t0 = time.monotonic()
    try:
        hf_r2.hub.push_to_hub(folder, TIMM_REPO, datasets=DATASET)
        out["error"] = None
    except Exception as err:
        out["error"], out["error_type"] = str(err), type(err).__name__
    out["seconds"] = time.monotonic() - t0
    out["unchanged"] = _folder_digest(folder) == before
    os.environ.pop("HF_TOKEN", None)
    try:
        hf_r2.hub.push_to_hub(folder, TIMM_REPO, datasets=DATASET)
        out["no_token_error"] = None
    except Exception as err:
        out["no_token_error"], out["no_token_error_type"] = str(err), type(err).__name__
    out["unchanged_after_no_token"] = _folder_digest(folder) == before
    from hf_r2.cli import main

    os.environ["HF_TOKEN"] = "x"
    out["cli_push_rc"] = main(["push", folder, TIMM_REPO, "--dataset", DATASET])
    out["unchanged_after_cli"] = _folder_digest(folder) == before
    return out


if __name__ == "__main__":
    scenario, work_dir = sys.argv[1], sys.argv[2]
    result = {"push": push, "load": load, "offline": offline, "fail": fail}[scenario](work_dir)
    with open(os.path.join(work_dir, f"{scenario}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
