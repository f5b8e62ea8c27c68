"""What a wheel user gets: the license and the `hf-r2 reproduce` presets travel with the package (setup.cfg declares
them; building a wheel is left to development.md's check, not to the test suite), and a preset runs from any
folder."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_r2.reproduce import CONFIG_PRESETS, ReproduceConfig, load_config
from hf_r2.reproduce.presets import preset_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "hf_r2" / "reproduce" / "configs"


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def test_the_license_file_is_apache_2_and_goes_into_the_wheel():
    cfg = _setup_cfg()
    assert cfg["metadata"]["license"] == "Apache-2.0"
    assert cfg["metadata"]["license_files"].split() == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_every_config_file_is_a_preset_shipped_as_package_data():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(file for file, _ in CONFIG_PRESETS.values())
    assert _setup_cfg()["options.package_data"]["hf_r2.reproduce"].split() == ["configs/*.yaml"]
    # a clone keeps the configs/ paths that the Makefile, docs/results.md and users' scripts name
    assert (ROOT / "configs").resolve() == CONFIGS.resolve()


@pytest.mark.parametrize("name", list(CONFIG_PRESETS))
def test_a_preset_resolves_through_importlib_resources_to_its_file(name):
    file = CONFIG_PRESETS[name][0]
    text = preset_file(name).read_text(encoding="utf-8")
    assert text == (CONFIGS / file).read_text(encoding="utf-8")
    assert text == (ROOT / "configs" / file).read_text(encoding="utf-8")
    assert load_config(name) == ReproduceConfig.from_file(CONFIGS / file)


def test_load_config_takes_a_path_and_names_the_presets_for_a_typo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("models: [test_resnet]\noutput_dir: out\n", encoding="utf-8")
    assert load_config("mine.yaml").models == ["test_resnet"]
    with pytest.raises(FileNotFoundError, match="the presets are tiny, paper"):
        load_config("tinyy")
    with pytest.raises(FileNotFoundError, match="No config file"):
        load_config("./tiny")  # a path, not the preset


def test_reproduce_tiny_status_from_a_folder_outside_the_repository(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hf_r2", "reproduce", "tiny", "--status"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "outputs/reproduce_tiny" in done.stdout and "0 done, 0 running, 0 interrupted, 6 missing" in done.stdout
    assert not any(tmp_path.iterdir()), "--status writes nothing"


def test_reproduce_help_lists_the_presets():
    done = subprocess.run([sys.executable, "-m", "hf_r2", "reproduce", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for name, (file, _) in CONFIG_PRESETS.items():
        assert f"\n  {name} " in done.stdout and file in done.stdout


# ---- what `make` installs and CI tests: requirements/constraints.txt, and the README's line made from it ----------


def _tested_with():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tested_with", ROOT / "requirements" / "tested_with.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements(cfg: configparser.ConfigParser) -> list[str]:
    """setup.cfg's install_requires and the onnx / coreml / test extras (the `%(...)s` references left out)."""
    text = "\n".join([cfg["options"]["install_requires"],
                      *(cfg["options.extras_require"][extra] for extra in ("onnx", "coreml", "test"))])
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("%(")]


def test_every_direct_dependency_is_pinned_within_its_range():
    from packaging.requirements import Requirement

    pins = _tested_with().pins()
    for line in _requirements(_setup_cfg()):
        requirement = Requirement(line)
        name = requirement.name.lower().replace("-", "_").replace(".", "_")
        assert name in pins, f"{requirement.name} is not pinned in requirements/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside setup.cfg's {line!r}"


def test_readme_tested_with_line_is_the_one_made_from_the_constraints():
    tested_with = _tested_with()
    current = tested_with.readme_paragraph((ROOT / "README.md").read_text(encoding="utf-8"))
    assert current == tested_with.paragraph(), "run: python requirements/tested_with.py --write"
