"""Bad input through the real `hf-r2` entry point (`python -m hf_r2` in a subprocess): each is one line
`hf-r2 <cmd>: error: ...` naming the flag or file and the fix, a non-zero status, no traceback (unless `--debug` /
`HF_R2_DEBUG=1`) and no output folder; and `--help` stays light (no torch / transformers / timm import)."""

import os
import shutil
import subprocess
import sys

import pytest


def hf_r2(*argv, cwd=None, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_R2_DEBUG": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hf_r2", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def assert_one_line(done, command: str, *fragments: str, code: int | None = None):
    # log lines and 🤗 Datasets' progress bars aside, stderr is the one error line
    lines = [line for line in done.stderr.splitlines() if line.strip() and " - WARNING - " not in line
             and " - INFO - " not in line and "examples/s]" not in line and "it/s]" not in line]
    assert done.returncode != 0 and (code is None or done.returncode == code), done
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"hf-r2 {command}: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _image_folder(root, classes=("cat", "dog"), per_class=6, bad: str | None = None):
    from PIL import Image

    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (40 * c, 10 * i, 0)).save(root / name / f"{i}.png")
    if bad:
        (root / classes[0] / bad).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_help_imports_no_heavy_library():
    """`hf-r2 --help` and `hf-r2 <cmd> --help` (but train's, built from the Trainer's fields) import neither torch
    nor transformers nor timm: what keeps them well under 1.5 s."""
    code = (
        "import sys\nfrom hf_r2.cli import main\n"
        "for argv in (['--help'], ['ptq', '--help'], ['evaluate', '--help'], ['qat', '--help'], "
        "['compress', '--help'], ['push', '--help'], ['download', '--help'], ['reproduce', '--help'], "
        "['demo', '--help'], ['env', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'timm', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-500:]


def test_ptq_and_evaluate_help_show_defaults_and_explain_choices():
    ptq = hf_r2("ptq", "--help").stdout.split("options:", 1)[1]
    for flag, words in (("--weight-range", "clipping"), ("--act-observer", "percentile"), ("--rounding", "AdaRound"),
                        ("--bn", "fold")):
        section = ptq.split(flag, 1)[1][:600]
        assert words.lower() in section.lower(), (flag, section)
    assert "(default: mse)" in ptq and "(default: reestimate)" in ptq and "(default: 8)" in ptq
    evaluate = hf_r2("evaluate", "--help").stdout
    assert "(default: 128)" in evaluate
    assert "--calibration-samples" not in evaluate  # evaluate does not calibrate: it does not offer the flag


def test_typo_flag_suggests_the_closest(tmp_path):
    done = hf_r2("train", "--model", "test_resnet", "--r2_wieght", "1", "--output_dir", tmp_path / "out")
    assert_one_line(done, "train", "--r2_wieght", "did you mean --r2_weight?", code=2)
    done = hf_r2("ptq", "m", "--w_bitz", "3")
    assert_one_line(done, "ptq", "did you mean --w_bits?", code=2)
    done = hf_r2("ptq", "m", "--a-bits", "eight")
    assert_one_line(done, "ptq", "--a-bits takes 2 to 8 or 'none'", code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--input_size", "0"], "--input_size must be a positive integer"),
    (["--input_size", "-3"], "--input_size must be a positive integer"),
    (["--max_train_samples", "0"], "--max_train_samples must be a positive integer"),
])
def test_train_bad_sizes_stop_before_any_work(tmp_path, data_dir, flags, fragment):
    out = tmp_path / "out"
    done = hf_r2("train", "--model", "test_resnet", "--dataset", "cifar10-tiny", "--data_dir", data_dir,
                 "--output_dir", out, *flags)
    assert_one_line(done, "train", fragment)
    assert not out.exists()


def test_missing_paths_are_not_blamed_on_the_hub(tmp_path, model_dir):
    for dataset in ("./nosuch", str(tmp_path / "nosuch")):
        done = hf_r2("evaluate", model_dir, "--dataset", dataset, cwd=tmp_path)
        assert_one_line(done, "evaluate", "--dataset", "no such folder or file")
        assert "Hub" not in done.stderr
    (tmp_path / "out").mkdir()
    done = hf_r2("evaluate", "out/nosuch", cwd=tmp_path)
    assert_one_line(done, "evaluate", "out/nosuch", "no such folder")
    assert "HF_HUB_OFFLINE" not in done.stderr
    done = hf_r2("--debug", "evaluate", "out/nosuch", cwd=tmp_path)
    assert "Traceback" in done.stderr and done.returncode != 0
    done = hf_r2("evaluate", "out/nosuch", cwd=tmp_path, env={"HF_R2_DEBUG": "1"})
    assert "Traceback" in done.stderr


def test_config_file_takes_the_flag_aliases(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: test_resnet\ndataset: ./nosuch\noutput_dir: {tmp_path / 'out'}\n")
    done = hf_r2("train", config, cwd=tmp_path)
    # `model:` and `dataset:` are accepted (no "unknown fields"): the run gets as far as the missing data
    assert_one_line(done, "train", "no such folder or file")
    assert not (tmp_path / "out").exists()


def test_image_folder_without_class_folders(tmp_path, model_dir):
    from PIL import Image

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(loose / f"{i}.png")
    done = hf_r2("evaluate", model_dir, "--dataset", loose)
    assert_one_line(done, "evaluate", "sub-folder named after the class", "<class>/<image>")
    assert "label_column" not in done.stderr


def test_bad_image_is_named_or_skipped_and_classes_are_checked(tmp_path, model_dir):
    folder = _image_folder(tmp_path / "pets", bad="broken.png")
    flags = ["--dataset", folder, "--input-size", "32", "--batch-size", "4"]
    done = hf_r2("evaluate", model_dir, *flags)
    assert_one_line(done, "evaluate", "broken.png", "--skip_bad_images")
    done = hf_r2("evaluate", model_dir, *flags, "--skip-bad-images")
    # the model's classes (CIFAR-10's ten) are not the folder's two: said, and stopped
    assert_one_line(done, "evaluate", "classes", "cat, dog", "--map-labels-by-name")
    done = hf_r2("evaluate", model_dir, *flags, "--skip-bad-images", "--map-labels-by-name")
    assert done.returncode == 0, done.stderr
    assert "Skipped 1 unreadable image" in done.stderr
    measured = [line for line in done.stdout.splitlines() if line.startswith("Measured on ")]
    assert measured and "images" in measured[0]


def test_truncated_safetensors_is_named(tmp_path, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    done = hf_r2("evaluate", broken)
    assert_one_line(done, "evaluate", "model.safetensors", "damaged or incomplete")
    done = hf_r2("train", "--model", broken, "--pretrained", "true", "--output_dir", tmp_path / "out")
    assert_one_line(done, "train", "model.safetensors", "damaged or incomplete")


def _run_patched_env(body: str):
    """`hf-r2 env` whose command is replaced by `body` (a function of `args`), in a fresh process."""
    code = ("import sys\nimport hf_r2.commands.env as env\n" + body
            + "\nenv.env_command = command\nfrom hf_r2.cli import main\nsys.exit(main(['env']))\n")
    env = {**os.environ, "HF_R2_DEBUG": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_a_bug_keeps_its_traceback():
    """Only mistakes of the user's are one line: an error no hf-r2 check raised on purpose is a bug, shown whole."""
    done = _run_patched_env("def command(args):\n    x, y = [1, 2, 3]")  # a ValueError, not raised on purpose
    assert done.returncode == 1 and "Traceback" in done.stderr and "too many values to unpack" in done.stderr
    deep = _run_patched_env("def command(args):\n    import torch\n    torch.zeros(2).view(3)")  # raised in torch
    assert "Traceback" in deep.stderr
    meant = _run_patched_env("def command(args):\n    from hf_r2 import R2Config\n    R2Config(r2_lambda=-1)")
    assert meant.returncode == 1 and "Traceback" not in meant.stderr  # hf-r2's own check, raised on purpose
    assert meant.stderr.strip() == "hf-r2 env: error: `r2_lambda` must be >= 0, got -1."


def test_ctrl_c_is_one_line():
    done = _run_patched_env("def command(args):\n    raise KeyboardInterrupt")
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("hf-r2 env: interrupted")


def _crafted_safetensors(case: str) -> bytes:
    """A `model.safetensors` made to break a loader: `case` names what is wrong with it."""
    import json

    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    header, data = {"w": f32}, b"\0" * 8
    if case == "header length past the end":
        return (10**12).to_bytes(8, "little") + b"{}"
    if case == "header not JSON":
        return (8).to_bytes(8, "little") + b"not json" + data
    if case == "header not a mapping":
        header = [1, 2]
    elif case == "entry not a mapping":
        header = {"w": 5}
    elif case == "metadata not strings":
        header = {"__metadata__": {"format": 1}, "w": f32}
    elif case == "offsets not numbers":
        header = {"w": {**f32, "data_offsets": ["0", "8"]}}
    elif case == "unknown dtype":
        header = {"w": {**f32, "dtype": "Q7"}}
    elif case == "shape does not fill its bytes":
        header = {"w": {**f32, "shape": [3]}}
    elif case == "overlapping offsets":
        header, data = {"w": f32, "v": {**f32, "data_offsets": [4, 12]}}, b"\0" * 12
    elif case == "offsets past the end":
        header = {"w": f32, "v": {**f32, "data_offsets": [8, 16]}}
    elif case == "bytes after the last tensor":
        data += b"\0" * 4
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("case", [
    "header length past the end", "header not JSON", "header not a mapping", "entry not a mapping",
    "metadata not strings", "offsets not numbers", "unknown dtype", "shape does not fill its bytes",
    "overlapping offsets", "offsets past the end", "bytes after the last tensor",
])
def test_crafted_safetensors_is_one_line_naming_the_file(tmp_path, model_dir, capsys, case):
    """`hf-r2 evaluate` / `ptq` on a folder whose model.safetensors was crafted to break a loader: one line that
    names the file, status 1; never a traceback or a safetensors error without a file name."""
    from hf_r2.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(_crafted_safetensors(case))
    for command in (["evaluate", str(broken)], ["ptq", str(broken), "--output-dir", str(tmp_path / "q")]):
        assert main(command) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if " - WARNING - " not in line]
        assert len(err) == 1 and err[0].startswith(
            f"hf-r2 {command[0]}: error: {broken / 'model.safetensors'} is damaged or incomplete ("), err
    assert not (tmp_path / "q").exists()
