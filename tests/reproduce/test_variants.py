"""The low-bit settings of `hf_r2.reproduce.variants`: what the shipped presets make of them must not move, since
rows cached under `~/.cache/hf-r2` are found again by their setting names and row specs."""

import hashlib
import json

import pytest

from hf_r2.reproduce.plan import row_spec
from hf_r2.reproduce.presets import CONFIG_PRESETS, load_config
from hf_r2.reproduce.variants import DEFAULT_LOW_BIT, normalise_setting, quant_config

# Computed before the settings took their defaults from the quant configs (issue 33): a change here invalidates
# every cached reproduce row of that preset.
PRESET_NAMES = {
    "tiny": ["W8A8 per-channel mse", "W4A8 per-tensor maxabs", "W2A8 per-channel mse", "W2A8 per-channel adaround",
             "W2A2 QAT", "W1 k-means", "W2 DKM"],
    "long": ["W8A8 per-channel mse", "W4A8 per-channel mse", "W2A8 per-tensor maxabs", "W2A8 per-tensor mse",
             "W2A8 per-channel maxabs", "W2A8 per-channel mse", "W2A8 per-channel adaround", "W2A2 QAT", "W2 k-means",
             "W1 k-means", "W1 DKM"],
    "headline": ["W2A8 per-tensor maxabs", "W2A8 per-channel mse", "W1 k-means", "W2 k-means", "W2A2 QAT", "W1 DKM",
                 "W2 DKM"],
    "finetune": ["W2A8 per-tensor maxabs", "W2A8 per-channel mse", "W1 k-means", "W2A8 QAT", "W2A2 QAT",
                 "W2A8 per-tensor maxabs + MagR", "W2A8 per-channel mse + MagR"],
}
PRESET_DIGESTS = {
    "tiny": "8dfea8cf6f962fc2b83ac9f6d2c54b506fefbe09",
    "paper": "9b0c8afa75c4840308ebd7777c3f8d5cee038ebe",
    "long": "b91ab8d5ed344c4f9a38a60a614bfaa5e74436fd",
    "evidence": "33d3c929e4465229f957206affbeaa8c099bdb9f",
    "headline": "e8b80ddff735cb655b81fd62d71058849b4a0a07",
    "finetune": "2d63a802c2df3bb3ff3c62ffcd20490e9765cf92",
}
DEFAULT_LOW_BIT_DIGEST = "bed6c8efdd5748c16d9a312b8d9a25999c969f24"


def _sha1(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("preset", sorted(CONFIG_PRESETS))
def test_preset_rows_keep_their_names_and_specs(preset):
    """Each row's name, row spec (but the environment's ONNX check) and quant config are as before."""
    config = load_config(preset)
    rows = []
    for setting in config.low_bit:
        spec = row_spec(setting, config)
        spec.pop("onnx", None)
        qconfig = quant_config(setting, config.adaround_iters).to_dict()
        qconfig.pop("hf_r2_version")
        rows.append([setting["name"], spec, qconfig])
    if preset in PRESET_NAMES:
        assert [name for name, _, _ in rows] == PRESET_NAMES[preset]
    assert preset in PRESET_DIGESTS, f"a new preset: add its digest {_sha1(rows)} here"
    assert _sha1(rows) == PRESET_DIGESTS[preset]


def test_default_low_bit_settings_are_unchanged():
    assert _sha1([normalise_setting(s, i) for i, s in enumerate(DEFAULT_LOW_BIT)]) == DEFAULT_LOW_BIT_DIGEST
