"""Every config class of hf-r2 (each `JsonConfigMixin` dataclass) round-trips through its file:
`save_pretrained -> from_pretrained -> to_dict` is equal, with non-default values in every field that has one, and the
file is plain JSON that names the hf-r2 version. A new config class without an example here fails the test."""

from __future__ import annotations

import json

import pytest

from hf_r2 import LoopConfig, R2Config
from hf_r2._utils import JsonConfigMixin
from hf_r2.quant import (
    AdaRoundConfig,
    BlockReconstructionConfig,
    EqualizeConfig,
    MagRConfig,
    PalettizeConfig,
    PTQConfig,
    QATConfig,
)
from hf_r2.reproduce import ReproduceConfig

EXAMPLES = {
    EqualizeConfig: dict(iterations=3, tolerance=1e-3, fold_bn=False, relu6="skip", calibration_batches=2,
                         include=["conv"], exclude=["fc"]),
    MagRConfig: dict(alpha=0.1, damping=0.0, iterations=7, calibration_batches=2, include=["conv"], exclude=["fc"]),
    R2Config: dict(loss="margin", weight=0.5, per_channel=True, margin_penalty=0.25, include=["conv"],
                   exclude=["fc$"], skip_first_last=True, skip_frozen=False, warmup_steps=7),
    LoopConfig: dict(output_dir="somewhere", num_epochs=3, seed=5, per_device_batch_size=8, optimizer="adamw",
                     learning_rate=0.002, weight_decay=0.1, lr_scheduler_type="constant", lr_warmup_steps=4,
                     gradient_accumulation_steps=2, logging_steps=3, save_model=False),
    BlockReconstructionConfig: dict(w_bits=3, a_bits=4, per_channel=False, weight_range="maxabs", iters=12, lr=0.05,
                                    act_lr=1e-3, batch_size=8, drop_prob=0.5, reg_weight=0.02, seed=3,
                                    calibration_batches=2, exclude=["fc"]),
    AdaRoundConfig: dict(iters=12, lr=0.05, reg_weight=0.02, beta_start=10.0, beta_end=3.0, num_samples=100,
                         seed=3),
    PalettizeConfig: dict(bits=1, method="dkm", group_size=4, include=["conv"], first_last_bits=4,
                          kmeans_iters=7, dkm_iters=2),
    PTQConfig: dict(w_bits=4, a_bits=None, per_channel=False, weight_range="maxabs", act_observer="percentile",
                    act_percentile=99.9, first_last_bits=None, rounding="adaround", adaround={"iters": 5},
                    bn="fold", calibration_batches=3, exclude=["head"]),
    QATConfig: dict(w_bits=3, a_bits=4, per_channel=False, weight_init="maxabs", first_last_bits=None,
                    learn_scales=False, calibration_batches=2),
    ReproduceConfig: dict(output_dir="out", dataset="cifar10-tiny", input_size=16, max_train_samples=64,
                          models=["resnet10t"], model_kwargs={"resnet10t": {"drop_rate": 0.1}}, epochs=1.5,
                          seeds=[3, 4], variants=["baseline", {"loss": "linf", "weight": 2.0}],
                          low_bit=[{"method": "ptq", "w_bits": 4, "a_bits": 8}, {"method": "kmeans", "w_bits": 1}],
                          calibration_samples=32, finetune_lr=0.01),
}


def _all_config_classes() -> set[type]:
    found, todo = set(), [JsonConfigMixin]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("hf_r2.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_config_class_has_an_example():
    missing = sorted(cls.__name__ for cls in _all_config_classes() - set(EXAMPLES))
    assert not missing, f"add a non-default example of {missing} to tests/test_configs.py"


@pytest.mark.parametrize("cls", sorted(EXAMPLES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_save_pretrained_from_pretrained_round_trip(cls, tmp_path):
    config = cls(**EXAMPLES[cls])
    default = cls()
    same = [name for name in EXAMPLES[cls] if getattr(config, name) == getattr(default, name)]
    assert not same, f"the example of {cls.__name__} should change {same} from the defaults"
    path = config.save_pretrained(tmp_path)
    on_disk = json.loads(open(path, encoding="utf-8").read())  # plain JSON
    assert on_disk["hf_r2_version"]
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert loaded.to_dict() == config.to_dict()
    assert loaded == config
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
