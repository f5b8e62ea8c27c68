"""Push to and download from the Hub (full precision, low-bit, and a folder with ONNX / Core ML exports): a round trip
against a local Hub on 127.0.0.1.

The local Hub (../shared/tools/local_hub: olah for reads, a receiver for writes) runs for this module only. The hub
scenarios run in subprocesses (tests/_hub_worker.py), because huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at
import and this test session imported it long before, offline. Nothing talks to a host other than 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_timm

import hf_r2
from hf_r2 import R2Config, R2Regularizer
from hf_r2._utils import write_json_atomic
from hf_r2.hub import from_pretrained, push_to_hub
from hf_r2.model_card import MODEL_CARD_TAGS, build_model_card, read_measured_accuracy

TESTS = Path(__file__).resolve().parent
LOCAL_HUB = Path(__file__).resolve().parents[2] / "shared" / "tools" / "local_hub"
WORKER = TESTS / "_hub_worker.py"
sys.path.insert(0, str(TESTS))
import _hub_worker as W  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hub_env(endpoint: str, home: Path, offline: bool = False) -> dict[str, str]:
    """The environment of a subprocess that talks to the Hub at `endpoint` only (HF_HOME `home`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN="x", HF_HOME=str(home),
        HF_HUB_OFFLINE="1" if offline else "0", TRANSFORMERS_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]),
    )
    return env


def _run_worker(scenario: str, work: Path, endpoint: str, home: Path, offline: bool = False, timeout: int = 120):
    proc = subprocess.run([sys.executable, str(WORKER), scenario, str(work)], env=_hub_env(endpoint, home, offline),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"hub worker {scenario!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(work / f"{scenario}.json") as f:
        return json.load(f), proc.stderr


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """Start the local Hub on free ports for this module; yields its endpoint; stops it."""
    if not (LOCAL_HUB / "start.sh").is_file():
        raise AssertionError(f"the local Hub is missing: {LOCAL_HUB}/start.sh")
    state = tmp_path_factory.mktemp("hub_state")
    port, olah_port = _free_port(), _free_port()
    started = subprocess.run(["bash", str(LOCAL_HUB / "start.sh"), str(state), str(port), str(olah_port)],
                             capture_output=True, text=True, timeout=180)
    try:
        if started.returncode != 0:
            raise AssertionError(f"local Hub did not start:\n{started.stdout}\n{started.stderr}")
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(LOCAL_HUB / "stop.sh"), str(state)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def hub_runs(local_hub, tmp_path_factory):
    """Run push -> load (fresh HF_HOME) -> offline load -> failing pushes against the local Hub."""
    work = tmp_path_factory.mktemp("hub")
    runs = {}
    runs["push"], _ = _run_worker("push", work, local_hub, work / "home_push")
    runs["load"], _ = _run_worker("load", work, local_hub, work / "home_load")
    # offline, from the cache `load` filled; the endpoint is a closed port, so any network use would fail
    runs["offline"], _ = _run_worker("offline", work, f"http://127.0.0.1:{_free_port()}", work / "home_load",
                                     offline=True)
    runs["fail"], runs["fail_stderr"] = _run_worker("fail", work, f"http://127.0.0.1:{_free_port()}",
                                                    work / "home_fail")
    return runs


# ---- round trip against the local Hub ----


def test_push_writes_folder_and_card(hub_runs):
    push = hub_runs["push"]
    for files in (push["timm_files"], push["hf_files"]):
        assert {"README.md", "config.json", "model.safetensors", "r2_config.json", "r2_stats.json"} <= set(files)
    assert "/commit/" in push["urls"]["timm"] and "/commit/" in push["urls"]["hf"]
    assert push["exist_error"] is not None and "already exists" in push["exist_error"]
    assert "exist_ok=True" in push["exist_error"]


def test_plain_libraries_and_hf_r2_load_identical_logits(hub_runs):
    load = hub_runs["load"]
    for key in ("timm_plain_max_diff", "hf_plain_max_diff", "timm_r2_max_diff", "hf_r2_max_diff"):
        assert load[key] == 0.0, key
    assert load["timm_plain_labels"] == ["cat", "dog", "frog"]
    assert load["hf_plain_id2label"] == {"0": "cat", "1": "dog", "2": "frog"}
    # the timm repo in transformers too (TimmWrapperForImageClassification), as its card says; its forward runs the
    # same layers through forward_features + forward_head, equal up to float rounding (3e-8 seen)
    assert load["timm_transformers_max_diff"] <= 1e-6
    assert load["timm_transformers_id2label"] == load["hf_plain_id2label"]
    for key in ("timm_r2_config", "hf_r2_config"):
        assert load[key]["loss"] == "margin" and load[key]["r2_lambda"] == 0.02
    assert {"overall", "per_layer"} <= set(load["timm_r2_stats_keys"])
    _, hf_model = W._models()
    expected_layers = sorted(R2Regularizer(hf_model, R2Config()).stats()["per_layer"])
    assert load["hf_r2_stats_layers"] == expected_layers
    assert load["cli_download_rc"] == 0
    assert {"config.json", "model.safetensors", "r2_config.json", "r2_stats.json", "README.md"} <= set(
        load["cli_download_files"])


def _eval_metrics(card_data: dict) -> list[dict]:
    return [m for entry in card_data.get("model-index", []) for r in entry["results"] for m in r["metrics"]]


def test_low_bit_export_round_trip(hub_runs):
    """A W2A8 export pushed as its own repo (base model: the FP repo) loads with hf_r2.from_pretrained, identical."""
    push, load = hub_runs["push"], hub_runs["load"]
    assert {"README.md", "config.json", "low_bit.safetensors", "low_bit_config.json"} <= set(push["low_bit_files"])
    assert "model.safetensors" not in push["low_bit_files"]
    assert load["low_bit_max_diff"] == 0.0
    assert load["low_bit_method"] == "ptq"
    assert load["low_bit_weights_distinct"] <= 4
    card = load["low_bit_card"]
    assert card["data"]["base_model"] == W.TIMM_REPO
    assert card["data"]["base_model_relation"] == "quantized"
    assert card["data"]["library_name"] == "hf-r2" and "low-bit" in card["data"]["tags"]
    results = card["data"]["model-index"][0]["results"]
    assert [r["metrics"][0]["value"] for r in results] == [W.LOW_BIT_ACCURACY]
    assert "| W2A8 | ptq-nearest | 0.3125 |" in card["text"]
    assert "hf_r2.from_pretrained" in card["text"] and "timm.create_model" not in card["text"]
    # `hf-r2 evaluate REPO_ID` on the export
    assert load["cli_evaluate_rc"] == 0
    (row,) = load["cli_evaluate_rows"]
    assert row["setting"] == "W2A8" and row["method"] == "ptq" and row["num_images"] == 16
    assert load["cli_evaluate_classes_rc"] == 1
    assert "3 classes" in load["cli_evaluate_classes_err"] and "10 classes" in load["cli_evaluate_classes_err"]


def test_cards_metadata_hold_only_measured_numbers(hub_runs):
    load = hub_runs["load"]
    timm_card, hf_card, trainer_card = load["timm_card"], load["hf_card"], load["trainer_card"]
    assert timm_card["data"]["library_name"] == "timm" and trainer_card["data"]["library_name"] == "timm"
    assert hf_card["data"]["library_name"] == "transformers"
    for card in (timm_card, hf_card, trainer_card):
        assert set(MODEL_CARD_TAGS) <= set(card["data"]["tags"])
        assert "2303.08253" in card["text"] and "Kundu, Arnav" in card["text"]
    assert timm_card["data"]["datasets"] == [W.DATASET]
    assert _eval_metrics(timm_card["data"]) == [
        {"type": "accuracy", "value": W.ACCURACY, "name": "Top-1 accuracy (full precision)"}]
    assert _eval_metrics(trainer_card["data"])[0]["value"] == W.TRAINER_ACCURACY
    assert "learning_rate" in trainer_card["text"]  # the Trainer's hyperparameters
    # the transformers model was never evaluated: no metric at all
    assert "model-index" not in hf_card["data"] and "metrics" not in hf_card["data"]
    assert "No evaluation results" in hf_card["text"]
    assert f'timm.create_model("hf-hub:{W.TIMM_REPO}", pretrained=True)' in timm_card["text"]
    assert f'AutoModelForImageClassification.from_pretrained("{W.HF_REPO}")' in hf_card["text"]


def test_cli_push_options_and_download_revision(hub_runs):
    push, load = hub_runs["push"], hub_runs["load"]
    assert push["cli_push_rc"] == 0 and "/commit/" in push["cli_push_stdout"]
    assert "README.md" in push["cli_push_files_after"]  # the card was written into the folder
    card = load["cli_card"]["data"]
    assert card["license"] == "mit" and card["base_model"] == "timm/resnet18.a1_in1k"
    # `--dataset uoft-cs/cifar10`, but the folder records that its number was measured on 200 images of a local copy
    # of cifar10-tiny: the card names the dataset, claims no model-index result on it and publishes no local path
    assert card["datasets"] == [W.DATASET] and "model-index" not in card
    text = load["cli_card"]["text"]
    assert (f"| full precision | float | {W.ACCURACY:.4f} | `cifar10-tiny` (local copy), `test` split, 200 images |"
            in text)
    assert f"None of these numbers was measured on the whole `{W.DATASET}`" in text
    assert W.LOCAL_DATA not in text and "## Data\n\n`cifar10-tiny` (local copy): trained on 1000 images" in text
    assert load["cli_download_revision_rc"] == 0
    assert {"config.json", "model.safetensors", "r2_config.json"} <= set(load["cli_download_revision_files"])
    assert load["cli_download_bad_revision_rc"] == 1
    assert "hf-r2 download: error:" in load["cli_download_bad_revision_err"]


def test_offline_load_from_cache(hub_runs):
    assert hub_runs["offline"] == {"max_diff": 0.0, "r2_loss": "margin", "has_stats": True}


def test_failed_push_is_clear_fast_and_keeps_folder(hub_runs):
    fail = hub_runs["fail"]
    assert fail["error_type"] == "HubPushError"
    assert "failed (ConnectError" in fail["error"]
    assert "retry the upload with `hf-r2 push" in fail["error"] and W.TIMM_REPO in fail["error"]
    assert fail["seconds"] < 10
    assert fail["unchanged"] and fail["unchanged_after_no_token"] and fail["unchanged_after_cli"]
    assert fail["no_token_error_type"] == "ValueError" and "HF_TOKEN" in fail["no_token_error"]
    assert fail["cli_push_rc"] == 1 and "hf-r2 push: error: Uploading" in hub_runs["fail_stderr"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")}


def test_push_an_exported_folder(local_hub, tmp_path, data_dir):
    """`hf-r2 export` of a W2A8 export to ONNX (top-1 measured on cifar10-tiny) and, where coremltools is installed,
    to Core ML, then `hf-r2 push`: the repo holds the folder's files byte for byte (model.onnx, the model.mlpackage
    folder, export_results.json), its README has the Deploy section, and the card's ONNX snippet runs as written
    (hf_hub_download from the Hub, then ONNX Runtime)."""
    pytest.importorskip("onnxruntime", reason="`hf-r2 export` needs `pip install 'hf-r2[onnx]'`")
    import importlib.util

    from huggingface_hub import ModelCard

    from hf_r2.cli import main
    from hf_r2.quant import PTQConfig, quantize_, save_low_bit

    repo = "r2-tests/timm-resnet-r2-w2a8-deploy"
    model = make_timm("test_resnet").eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    folder = tmp_path / "w2a8"
    save_low_bit(quantize_(model, PTQConfig(w_bits=2, a_bits=8, bn="keep"), [{"pixel_values": x}]), str(folder),
                 method="ptq")
    assert main(["export", str(folder), "--dataset", "cifar10-tiny", "--data-dir", str(data_dir),
                 "--max-eval-samples", "32"]) == 0
    coreml = importlib.util.find_spec("coremltools") is not None
    if coreml:
        assert main(["export", str(folder), "--format", "coreml"]) == 0
    local = tmp_path / "downloaded"
    code = ("import sys; from hf_r2.cli import main; "
            "sys.exit(main(['push', sys.argv[1], sys.argv[2]]) or main(['download', sys.argv[2], '--local-dir', "
            "sys.argv[3]]))")
    done = subprocess.run([sys.executable, "-c", code, str(folder), repo, str(local)],
                          env=_hub_env(local_hub, tmp_path / "home"), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    pushed, sent = _files(local), _files(folder)
    assert {"README.md", "model.onnx", "export_results.json", "low_bit.safetensors"} <= set(pushed)
    assert pushed == sent  # every file, the card hf-r2 push wrote included, byte for byte
    assert coreml == any(name.startswith("model.mlpackage/") for name in pushed)
    card = ModelCard.load(local / "README.md")
    exports = json.loads(pushed["export_results.json"])["exports"]
    accuracy = exports["onnx"]["accuracy"]
    assert "## Deploy" in card.text and "onnx" in card.data.tags and ("coreml" in card.data.tags) == coreml
    assert (f"- Top-1 accuracy on `cifar10-tiny` (32 images of the `test` split, 32 pixels): "
            f"{accuracy['onnxruntime']:.4f} in ONNX Runtime, {accuracy['hf_r2']:.4f} in hf-r2") in card.text
    assert f'hf_hub_download("{repo}", "model.onnx")' in card.text
    assert ("### Core ML: `model.mlpackage`" in card.text) == coreml
    # the card's ONNX snippet, as a reader would run it (a fresh cache)
    snippet = card.text.split("### ONNX")[1].split("```python\n")[1].split("```")[0]
    done = subprocess.run([sys.executable, "-c", snippet + "print(list(logits.shape))"],
                          env=_hub_env(local_hub, tmp_path / "reader"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == "[1, 10]"


# ---- no Hub needed ----


@pytest.fixture
def timm_folder(tmp_path):
    model = make_timm("test_resnet", num_classes=3).eval()
    cfg = R2Config(loss="linf", weight=0.05)
    hf_r2.save_model_folder(model, str(tmp_path / "m"), r2_config=cfg, stats=R2Regularizer(model, cfg).stats())
    return model, str(tmp_path / "m")


@pytest.mark.parametrize("bad", ["bad--id", "a/b/c", "x" * 97, "org/name.git", ""])
def test_invalid_repo_id(timm_folder, bad):
    _, folder = timm_folder
    with pytest.raises(ValueError, match="is not a valid Hub repo id"):
        push_to_hub(folder, bad)
    with pytest.raises(ValueError, match="is not a valid Hub repo id"):
        hf_r2.hub.download(bad)


def test_push_module_needs_save_directory(timm_folder):
    model, _ = timm_folder
    with pytest.raises(ValueError, match="save_directory"):
        push_to_hub(model, "me/model")


def test_push_without_token_names_both_ways_to_pass_one(timm_folder, monkeypatch):
    import huggingface_hub

    _, folder = timm_folder
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match=r"pass `token=` \(`hf-r2 push --token`\)\. The local folder .* is complete"):
        push_to_hub(folder, "me/model")
    assert not os.path.exists(os.path.join(folder, "README.md"))  # refused before the card is written


def test_push_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_to_hub(str(tmp_path), "me/model")


def test_from_pretrained_local_folder(timm_folder, tmp_path):
    model, folder = timm_folder
    x = torch.randn(2, 3, 32, 32)
    loaded, r2_config, stats, low_bit = from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert r2_config == R2Config(loss="linf", weight=0.05)
    assert stats == json.loads((Path(folder) / "r2_stats.json").read_text())
    assert low_bit is None
    os.remove(Path(folder) / "r2_config.json")
    os.remove(Path(folder) / "r2_stats.json")
    assert from_pretrained(folder)[1:] == (None, None, None)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        from_pretrained(str(tmp_path / "missing"))


def test_card_accuracy_sources(timm_folder):
    _, folder = timm_folder
    data = build_model_card(folder, "me/m").data.to_dict()
    assert "metrics" not in data and "model-index" not in data and data["library_name"] == "timm"
    write_json_atomic(os.path.join(folder, "all_results.json"), {"eval_accuracy": 0.5, "train_loss": 2.0})
    assert read_measured_accuracy(folder) == 0.5
    write_json_atomic(os.path.join(folder, "eval_results.json"), {"eval_accuracy": 0.75})
    assert read_measured_accuracy(folder) == 0.75  # eval_results.json first
    # measured but no dataset: on the card and in `metrics`, but no model-index (which needs a dataset)
    card = build_model_card(folder, "me/m")
    assert card.data.to_dict()["metrics"] == ["accuracy"] and "model-index" not in card.data.to_dict()
    assert "| 0.7500 |" in card.text
    card = build_model_card(folder, "me/m", datasets="uoft-cs/cifar10", base_model="timm/resnet18.a1_in1k")
    assert _eval_metrics(card.data.to_dict())[0]["value"] == 0.75
    assert card.data.base_model == "timm/resnet18.a1_in1k"
    stats = json.loads((Path(folder) / "r2_stats.json").read_text())
    for name in stats["per_layer"]:
        assert f"| `{name}` |" in card.text


def test_card_reads_dataset_training_and_low_bit_rows_from_folder(timm_folder):
    """Without flags the card cites the dataset and training arguments `hf-r2 train` recorded, and lists the
    low-bit rows the quant commands measured (each in the model-index)."""
    from hf_r2.quant import update_results
    from hf_r2.saving import update_training_info

    _, folder = timm_folder
    write_json_atomic(os.path.join(folder, "eval_results.json"), {"eval_accuracy": 0.75})
    update_training_info(folder, dataset="cifar10", dataset_id="uoft-cs/cifar10",
                         training_arguments={"learning_rate": 0.003, "seed": 1})
    update_results(folder, [{"setting": "W2A8", "method": "ptq-nearest", "accuracy": 0.5, "bits_per_weight": 2.2,
                             "dataset": "cifar10"}])
    card = build_model_card(folder, "me/m")
    data = card.data.to_dict()
    assert data["datasets"] == ["uoft-cs/cifar10"]
    assert [m["value"] for m in _eval_metrics(data)] == [0.75, 0.5]
    assert "| `learning_rate` | `0.003` |" in card.text
    assert "| W2A8 | ptq-nearest | 0.5000 | `cifar10` | 2.20 |" in card.text
    assert "base_model_relation" not in data  # a full-precision folder


def test_trainer_create_model_card(tmp_path):
    from huggingface_hub import ModelCard

    from hf_r2 import R2Trainer, R2TrainingArguments

    args = R2TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, r2_loss="kurtosis")
    trainer = R2Trainer(make_timm("test_resnet", num_classes=3), args)
    trainer.save_model()
    trainer.state.log_history.append({"eval_accuracy": 0.125, "step": 0})
    trainer.create_model_card(model_name="out", dataset="uoft-cs/cifar10", finetuned_from="timm/test")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "timm" and set(MODEL_CARD_TAGS) <= set(card.data.tags)
    assert card.data.base_model == "timm/test"
    assert _eval_metrics(card.data.to_dict())[0]["value"] == 0.125
    assert "`'kurtosis'`" in card.text


def test_card_claims_a_hub_dataset_only_for_that_dataset(timm_folder):
    """A model trained on a local subset (`cifar10-tiny`, 16 images) does not get `datasets: [uoft-cs/cifar10]` nor a
    model-index entry for it; the card names what was used: the local copy, the split, the image counts."""
    from hf_r2.saving import update_training_info

    _, folder = timm_folder
    write_json_atomic(os.path.join(folder, "eval_results.json"), {"eval_accuracy": 0.25})
    # what `train_model` alone records (no `data`): the name decides, and `cifar10-tiny` is a subset
    update_training_info(folder, dataset="cifar10-tiny", dataset_id="uoft-cs/cifar10")
    card = build_model_card(folder, "me/m")
    assert "datasets" not in card.data.to_dict() and "model-index" not in card.data.to_dict()
    assert "uoft-cs/cifar10" not in card.text
    assert "| full precision | float | 0.2500 | `cifar10-tiny` | - |" in card.text
    # what `hf-r2 train` records
    update_training_info(folder, data={"dataset": "cifar10-tiny", "source": "local copy /d/cifar10-tiny",
                                       "hub_id": None, "train_split": "train", "eval_split": "test",
                                       "train_images": 16, "eval_images": 200, "input_size": 32})
    card = build_model_card(folder, "me/m")
    assert "datasets" not in card.data.to_dict() and "uoft-cs/cifar10" not in card.text
    assert ("| full precision | float | 0.2500 | `cifar10-tiny` (local copy), `test` split, 200 images | - |"
            in card.text)
    assert ("`cifar10-tiny` (local copy): trained on 16 images of the `train` split, evaluated on 200 images of the "
            "`test` split, at 32 pixels.") in card.text
    assert "/d/" not in card.text  # the local path stays off the card
    # the whole Hub dataset is cited
    update_training_info(folder, data={"dataset": "uoft-cs/cifar10", "source": "Hub dataset uoft-cs/cifar10",
                                       "hub_id": "uoft-cs/cifar10", "train_split": "train", "eval_split": "test",
                                       "train_images": 50000, "eval_images": 10000, "input_size": None})
    assert build_model_card(folder, "me/m").data.to_dict()["datasets"] == ["uoft-cs/cifar10"]


# ---- what `hf-r2 push` leaves out, and what it refuses: round trips against the local Hub ----

_PUSH_THEN_DOWNLOAD = """
import sys
import hf_r2.hub
from hf_r2.cli import main
hf_r2.hub.LARGE_FILE_BYTES = int(sys.argv[4])
push = main(['push', sys.argv[1], sys.argv[2], *sys.argv[5:]])
print('PUSH_RC', push)
sys.exit(push or main(['download', sys.argv[2], '--local-dir', sys.argv[3]]))
"""


def _push_cli(endpoint: str, tmp_path: Path, folder: Path, repo: str, *flags: str, large: int = 2 * 10**9):
    local = tmp_path / f"down-{repo.split('/')[-1]}"
    done = subprocess.run([sys.executable, "-c", _PUSH_THEN_DOWNLOAD, str(folder), repo, str(local), str(large),
                           *flags], env=_hub_env(endpoint, tmp_path / "home"), capture_output=True, text=True,
                          timeout=180)
    return done, local


def _downloaded(local: Path) -> dict[str, bytes]:
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*"))
            if p.is_file() and not p.relative_to(local).parts[0].startswith(".")}


def test_push_leaves_out_hidden_files_links_and_training_args(local_hub, tmp_path, timm_folder):
    """Hidden files below the top level, links out of the folder (to /etc/passwd, to a secret, to a folder), a
    link inside it, `training_args.bin` and checkpoints stay local and are named; the rest goes up byte for byte;
    a file over the size limit gets a warning; `--keep-readme` uploads the user's README.md instead of the card."""
    _, folder = timm_folder
    folder = Path(folder)
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("outside secret\n")
    (outside / "dir" / "x.txt").write_text("outside dir\n")
    (folder / "sub" / ".ssh").mkdir(parents=True)
    (folder / "sub" / ".env").write_text("HF_TOKEN=hf_not_this_one\n")
    (folder / "sub" / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
    (folder / "sub" / "notes.txt").write_text("goes up\n")
    (folder / ".env").write_text("top-level hidden\n")
    os.symlink("/etc/passwd", folder / "passwd")
    os.symlink(outside / "secret.txt", folder / "sub" / "secret.txt")
    os.symlink(outside / "dir", folder / "linked_dir")
    os.symlink("../config.json", folder / "sub" / "config_link.json")
    torch.save({"hub_token": "hf_pickled"}, folder / "training_args.bin")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "model.safetensors").write_bytes(b"ckpt")
    done, local = _push_cli(local_hub, tmp_path, folder, "r2-tests/left-out", large=1000)
    assert done.returncode == 0, done.stderr[-4000:]
    pushed = _downloaded(local)
    expected = {"README.md", "config.json", "model.safetensors", "r2_config.json", "r2_stats.json", "sub/notes.txt"}
    assert set(pushed) == expected
    for name in expected:
        assert pushed[name] == (folder / name).read_bytes()
    (warning,) = [line for line in done.stderr.splitlines() if "Left out of the upload" in line]
    for named in (".env (hidden)", "sub/.env (hidden)", "sub/.ssh/ (hidden)", "passwd (symbolic link)",
                  "sub/secret.txt (symbolic link)", "linked_dir/ (symbolic link)",
                  "sub/config_link.json (symbolic link)", "training_args.bin (pickled training arguments"):
        assert named in warning, named
    assert "checkpoint-1" not in warning  # routine, not listed
    large = [line for line in done.stderr.splitlines() if "model.safetensors in" in line]
    assert len(large) == 1 and "uploading it anyway" in large[0]
    # --keep-readme: the user's own README.md goes up as it is, no card written
    (folder / "README.md").write_text("# my own README\n")
    done, local = _push_cli(local_hub, tmp_path, folder, "r2-tests/own-readme", "--keep-readme")
    assert done.returncode == 0, done.stderr[-4000:]
    assert _downloaded(local)["README.md"] == b"# my own README\n" == (folder / "README.md").read_bytes()


def test_push_refuses_a_file_holding_the_token_and_a_linked_config(local_hub, tmp_path, timm_folder):
    """A text file holding the token the push uses is refused before anything is written or uploaded (one line);
    so is a folder whose config.json is a link; the card replaces a README.md that is a link."""
    _, folder = timm_folder
    folder = Path(folder)
    token = "hf_localhubtoken0123456789"
    (folder / "notes").mkdir()
    (folder / "notes" / "run.log").write_text(f"... login token={token} ...\n")
    before = _files(folder)
    done, local = _push_cli(local_hub, tmp_path, folder, "r2-tests/token-file", "--token", token)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("hf-r2 push: error:")]
    assert len(errors) == 1 and "notes/run.log" in errors[0] and "holds the Hub token" in errors[0]
    assert "Traceback" not in done.stderr and "PUSH_RC 1" in done.stdout
    assert _files(folder) == before  # no card written either
    listed = subprocess.run([sys.executable, "-c", "import sys, huggingface_hub as h; "
                             "print(h.HfApi().repo_exists(sys.argv[1]))", "r2-tests/token-file"],
                            env=_hub_env(local_hub, tmp_path / "home"), capture_output=True, text=True, timeout=60)
    assert listed.stdout.strip() == "False", listed.stderr[-2000:]  # refused before create_repo
    # the same folder pushes once the token is gone; a README.md that links out is replaced by the card
    (folder / "notes" / "run.log").write_text("no token here\n")
    (tmp_path / "their_readme.md").write_text("outside README\n")
    (folder / "README.md").unlink(missing_ok=True)
    os.symlink(tmp_path / "their_readme.md", folder / "README.md")
    done, local = _push_cli(local_hub, tmp_path, folder, "r2-tests/token-file", "--token", token)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "notes/run.log" in _downloaded(local) and b"hf-r2" in _downloaded(local)["README.md"]
    assert (tmp_path / "their_readme.md").read_text() == "outside README\n"
    # config.json as a link (e.g. a Hub cache snapshot): refused in one line
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in os.listdir(folder):
        if os.path.isfile(folder / name) and not os.path.islink(folder / name):
            os.symlink(folder / name, snapshot / name)
    done, _ = _push_cli(local_hub, tmp_path, snapshot, "r2-tests/snapshot", "--token", token)
    assert done.returncode == 1 and "config.json in" in done.stderr and "symbolic link" in done.stderr
    assert "Traceback" not in done.stderr


_REMOTE_TIMM = """
import sys, torch
import hf_r2
from hf_r2.cli import main
assert main(['push', sys.argv[1], sys.argv[2]]) == 0
model = hf_r2.create_model(sys.argv[2], pretrained=True).eval()
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save({'logits': model(x), 'type': type(model).__name__}, sys.argv[3] + '/remote.pt')
sys.exit(main(['train', '--model', sys.argv[2], '--pretrained', 'true', *sys.argv[4:]]))
"""


def test_train_from_a_timm_layout_hub_repo_without_hf_hub_prefix(local_hub, tmp_path, timm_folder, data_dir):
    """`hf-r2 train --model org/name --pretrained` for a repo in timm's layout (no `hf-hub:`): timm loads it with
    its weights (not transformers' TimmWrapper, which failed with `multiple values for keyword argument
    'num_classes'`), and the head is resized to the data's 10 classes."""
    from conftest import tiny_train_argv

    model, folder = timm_folder
    argv = [a for a in tiny_train_argv(data_dir, tmp_path / "run") if a != "test_resnet"]
    argv.remove("--model")
    done = subprocess.run([sys.executable, "-c", _REMOTE_TIMM, folder, "r2-tests/remote-timm", str(tmp_path), *argv],
                          env=_hub_env(local_hub, tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Saved the model to" in done.stdout
    remote = torch.load(tmp_path / "remote.pt")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(x))
    assert remote["type"] == type(model).__name__  # timm's own class, not a transformers wrapper
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
