"""`palettize` / `palettize_`, `palette_indices` and `PalettizeConfig` (hf_r2.quant.cluster.palettize)."""

import copy
import json

import pytest
import torch
from conftest import conv_net, make_timm
from torch import nn

from hf_r2 import find_target_modules
from hf_r2.quant.cluster.palettize import (
    PALETTIZE_CONFIG_NAME,
    PalettizeConfig,
    PalettizeMethod,
    palette_indices,
    palettize,
    palettize_,
)

# ---- palettize ----------------------------------------------------------------------------------------------------


def _distinct_per_group(w: torch.Tensor, groups: int) -> int:
    return max(row.unique().numel() for row in w.reshape(groups, -1))



def assert_kmeans_fixed_point(w: torch.Tensor, palette: torch.Tensor, rtol: float = 1e-4) -> None:
    """The definition of a k-means solution, in float64: every palette entry that some weight has as its nearest
    entry is the mean of those weights (Lloyd's fixed point)."""
    w, p = w.detach().double().reshape(-1), palette.detach().double().reshape(-1)
    nearest = (w[:, None] - p[None, :]).abs().argmin(1)
    scale = w.abs().max().item()
    for j in range(p.numel()):
        members = w[nearest == j]
        if members.numel():
            assert abs(members.mean().item() - p[j].item()) <= rtol * scale, (j, members.mean(), p[j])


def sse(w: torch.Tensor, palette: torch.Tensor) -> float:
    w, p = w.detach().double().reshape(-1), palette.detach().double().reshape(-1)
    return ((w[:, None] - p[None, :]).abs().min(1).values ** 2).sum().item()


def best_two_means_sse(w: torch.Tensor) -> float:
    """The least squared error of 2 clusters of a 1-d set: try every split of the sorted values."""
    v = torch.sort(w.detach().double().reshape(-1)).values
    best = float("inf")
    for k in range(1, v.numel()):
        a, b = v[:k], v[k:]
        best = min(best, ((a - a.mean()) ** 2).sum().item() + ((b - b.mean()) ** 2).sum().item())
    return best

@pytest.mark.parametrize("bits", [1, 2, 3])
def test_palettize_copy_per_tensor(bits):
    model = conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pmodel = palettize(model, PalettizeConfig(bits=bits))
    assert pmodel is not model
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    assert not hasattr(model[0], "weight_palette")
    assert list(pmodel.state_dict()) == list(before)  # same keys: the palette buffer is not persistent
    targets = dict(find_target_modules(pmodel))
    for name, module in targets.items():
        w0 = before[f"{name}.weight"]
        palette = module.weight_palette
        assert palette.shape == (1, 2**bits) and palette.dtype == w0.dtype
        assert torch.all(palette[:, 1:] >= palette[:, :-1])
        n_distinct = module.weight.unique().numel()
        assert n_distinct <= 2**bits
        if bits == 1:  # 1 bit: exactly 2 values for a generic weight
            assert n_distinct == 2
        # the palette is a k-means solution of the original weight (checked from its definition, not with the
        # function the code calls), and at 1 bit the best 2-means split, found by trying every split
        assert_kmeans_fixed_point(w0, palette[0])
        if bits == 1:
            assert sse(w0, palette[0]) <= best_two_means_sse(w0) * (1 + 1e-6) + 1e-12
        nearest = (w0.reshape(-1, 1) - palette[0]).abs().argmin(1)
        assert torch.equal(module.weight.reshape(-1), palette[0][nearest])
    for k, v in pmodel.state_dict().items():  # biases and BN untouched
        if not k.endswith("weight") or k.startswith("1."):
            assert torch.equal(v, before[k]), k
    assert torch.isfinite(pmodel(torch.randn(2, 3, 8, 8))).all()


def test_palettize_in_place_kwargs_and_idempotent():
    model = conv_net()
    ref = palettize(model, PalettizeConfig(bits=2, group_size=2, exclude=["^7$"]))
    same = palettize_(model, bits=2, group_size=2, exclude=["^7$"])
    assert same is model
    for (k, v), v2 in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, v2), k
    override = palettize(conv_net(), PalettizeConfig(bits=8, exclude=["^7$"]), bits=2, group_size=2)
    assert override[0].weight_palette.shape == (4, 4)
    # palettizing again changes nothing, palette included
    again = palettize(model, PalettizeConfig(bits=2, group_size=2, exclude=["^7$"]))
    for name, module in find_target_modules(model, exclude=["^7$"]):
        other = again.get_submodule(name)
        assert torch.equal(module.weight, other.weight), name
        assert torch.equal(module.weight_palette, other.weight_palette), name


@pytest.mark.parametrize("group_size, groups", [(1, [8, 8, 6, 5]), (2, [4, 4, 3, None])])
def test_palettize_group_size(group_size, groups):
    model = conv_net()
    if None in groups:  # 2 does not divide the head's 5 outputs: a clear error, nothing changed
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=r"`group_size=2` does not divide the 5 output channels of layer '7'"):
            palettize_(model, bits=2, group_size=2)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not hasattr(model[0], "weight_palette")
        palettize_(model, bits=2, group_size=2, exclude=[r"^7$"])  # the fix the message suggests
        groups = groups[:3]
        assert not hasattr(model[7], "weight_palette")
    else:
        palettize_(model, bits=2, group_size=group_size)
    for (name, module), g in zip(find_target_modules(model), groups):
        assert module.weight_palette.shape == (g, 4), name
        assert _distinct_per_group(module.weight, g) <= 4
        # each group's weights come from its own palette row
        rows = module.weight.reshape(g, -1)
        for r in range(g):
            assert set(rows[r].tolist()) <= set(module.weight_palette[r].tolist())
    # per-channel palettes are not all the same (the groups are clustered separately)
    assert not torch.equal(model[0].weight_palette[0], model[0].weight_palette[1])


def test_palettize_constant_zero_and_dtypes():
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[3:].fill_(0.5)
    palettize_(lin, bits=2, group_size=3)
    assert torch.isfinite(lin.weight_palette).all()
    assert torch.equal(lin.weight[:3], torch.zeros(3, 4)) and torch.equal(lin.weight[3:], torch.full((3, 4), 0.5))
    assert torch.equal(palette_indices(lin), torch.zeros(6, 4, dtype=torch.uint8))
    for dtype in (torch.float64, torch.bfloat16):
        lin = nn.Linear(16, 4).to(dtype)
        palettize_(lin, bits=2)
        assert lin.weight.dtype == dtype and lin.weight_palette.dtype == dtype
        idx = palette_indices(lin)
        assert torch.equal(lin.weight_palette[0][idx.long()], lin.weight)


def test_palette_indices():
    model = palettize(conv_net(), PalettizeConfig(bits=3, group_size=2, exclude=["7"]))
    conv = model[3]  # depthwise, (8, 1, 3, 3), 4 groups
    idx = palette_indices(conv)
    assert idx.dtype == torch.uint8 and idx.shape == conv.weight.shape
    rows = idx.reshape(4, -1).long()
    assert torch.equal(conv.weight_palette.gather(1, rows).reshape(conv.weight.shape), conv.weight)
    with pytest.raises(ValueError, match="no `weight_palette` buffer"):
        palette_indices(model[7])
    with torch.no_grad():
        conv.weight.add_(1e-3)
    with pytest.raises(ValueError, match="no longer holds only values of its `weight_palette`"):
        palette_indices(conv)


@pytest.mark.parametrize("model_name", ["timm_cnn", "hf_resnet", "hf_convnext", "mobilenetv3_small_050"])
def test_palettize_real_models(request, model_name):
    if model_name.startswith("mobilenet"):  # depthwise and squeeze-excite convs, 0.6M parameters
        model = make_timm(model_name)
    else:
        model = request.getfixturevalue(model_name)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    pmodel = palettize(model, PalettizeConfig(bits=2, skip_first_last=True))
    assert list(pmodel.state_dict()) == keys
    targets = find_target_modules(pmodel)
    assert not hasattr(targets[0][1], "weight_palette") and not hasattr(targets[-1][1], "weight_palette")
    for name, module in targets[1:-1]:
        assert module.weight.unique().numel() <= 4, name
        palette_indices(module)
    out = pmodel(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # the palettized weights load into a plain model of the same architecture
    plain = copy.deepcopy(model)
    plain.load_state_dict(pmodel.state_dict(), strict=True)


def test_first_last_bits_gives_the_end_layers_wider_palettes(timm_cnn):
    """first_last_bits=8: the first and last target layer get max(8, bits)-bit palettes (k-means of their own), the
    others `bits`; each layer's palette equals kmeans_1d of its own weights at its own palette size."""
    model = timm_cnn.eval()
    targets = [name for name, _ in find_target_modules(model)]
    out = palettize(model, PalettizeConfig(bits=1, first_last_bits=8))
    for index, name in enumerate(targets):
        k = 256 if index in (0, len(targets) - 1) else 2
        module = out.get_submodule(name)
        assert module.weight_palette.shape == (1, k), name
        assert_kmeans_fixed_point(model.get_submodule(name).weight.detach(), module.weight_palette[0])
        assert module.weight.unique().numel() <= k
    # first_last_bits below bits changes nothing: the end layers get max(first_last_bits, bits)
    same = palettize(model, PalettizeConfig(bits=2, first_last_bits=1))
    ref = palettize(model, PalettizeConfig(bits=2))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), ref.state_dict().values()))
    assert PalettizeConfig(bits=2, first_last_bits=8).layer_bits(0, 5) == 8
    assert PalettizeConfig(bits=2, first_last_bits=8).layer_bits(2, 5) == 2


# ---- PalettizeConfig ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        PalettizeConfig(),
        PalettizeConfig(bits=4, method="dkm", group_size=16, include=["layer"], exclude=["fc"], temperature=0.5),
        PalettizeConfig(bits=1, method=PalettizeMethod.KMEANS, skip_first_last=True, kmeans_iters=5, dkm_iters=1),
        PalettizeConfig(bits=1, first_last_bits=8),
    ],
)
def test_config_json_round_trip(tmp_path, config):
    path = config.save_pretrained(tmp_path)
    assert path.endswith(PALETTIZE_CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)
    assert data["bits"] == config.bits and "hf_r2_version" in data
    loaded = PalettizeConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.to_dict() == config.to_dict()
    assert PalettizeConfig.from_pretrained(path) == config
    assert isinstance(loaded.method, str) and config.num_centroids == 2**config.bits


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 0}, r"`bits` must be an integer from 1 to 8 \(2\^bits centroids\), got 0"),
        ({"bits": 9}, "`bits` must be an integer from 1 to 8"),
        ({"bits": True}, "`bits` must be an integer from 1 to 8"),
        (
            {"method": "k-means"},
            r"`method` must be one of 'kmeans', 'dkm', got 'k-means'. Did you mean `method='kmeans'`",
        ),
        ({"method": "lloyd"}, "`method` must be one of 'kmeans', 'dkm', got 'lloyd'"),
        ({"group_size": 0}, r"`group_size` must be a positive integer .* got 0"),
        ({"group_size": "4"}, r"`group_size` must be a positive integer .* got '4'"),
        ({"skip_first_last": 1}, "`skip_first_last` must be `True` or `False`, got 1"),
        ({"first_last_bits": 0}, "`first_last_bits` must be an integer from 1 to 8 or `None`, got 0"),
        ({"first_last_bits": 8, "skip_first_last": True}, "`skip_first_last=True` leaves the first and last layer"),
        ({"kmeans_iters": 0}, "`kmeans_iters` must be an integer >= 1, got 0"),
        ({"dkm_iters": 1.5}, "`dkm_iters` must be an integer >= 1, got 1.5"),
        ({"temperature": 0.0}, "`temperature` must be a finite number > 0 .* got 0.0"),
        ({"temperature": float("inf")}, "`temperature` must be a finite number > 0 .* got inf"),
        ({"temperature": "1"}, "`temperature` must be a finite number > 0 .* got '1'"),
        ({"include": ["("]}, "`include` holds an invalid regular expression"),
        ({"exclude": 3}, "`exclude` must be a list of regular expressions"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PalettizeConfig(**kwargs)


def test_config_misc_errors():
    with pytest.raises(ValueError, match=r"Unknown `PalettizeConfig` field\(s\) \['bit'\]"):
        PalettizeConfig.from_dict({"bit": 2})
    with pytest.raises(ValueError, match=r"Unknown `PalettizeConfig` field\(s\) \['n_bits'\]"):
        palettize(conv_net(), n_bits=2)
    with pytest.raises(TypeError, match="`config` must be a `PalettizeConfig` or `None`, got dict"):
        palettize(conv_net(), {"bits": 2})
    with pytest.raises(ValueError, match="No target layer left"):
        palettize(conv_net(), include=["nothing_matches"])
    assert PalettizeConfig(temperature=2).temperature == 2.0
