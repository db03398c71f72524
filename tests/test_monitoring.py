"""monitoring.py: the fresh-initialisation copy behind the ``fresh_init_<method>`` reference."""

import pytest
import torch
from helpers import tiny_cnn, tiny_vit

from tsm_lightning.monitoring import fresh_copy


def test_fresh_copy_shares_no_weights_and_keeps_their_scale():
    for model in (tiny_cnn(), tiny_vit(num_layers=2)):
        with torch.no_grad():
            for param in model.parameters():  # a trained-looking model: no parameter at its initial value
                param.add_(torch.randn_like(param) * 0.1)
        original = {name: p.clone() for name, p in model.named_parameters()}
        rng = torch.get_rng_state()
        fresh = fresh_copy(model, seed=1)
        assert torch.equal(torch.get_rng_state(), rng)
        for name, param in fresh.named_parameters():
            assert torch.equal(dict(model.named_parameters())[name], original[name]), name  # the model is untouched
            if param.numel() > 1:
                assert not torch.allclose(param, original[name]), f"{name} kept the model's values"
        for name, param in fresh.named_parameters():  # every tensor redrawn at its own scale
            if param.numel() > 100:
                ratio = float(param.std() / original[name].std())
                assert 0.8 < ratio < 1.2, (name, ratio)
        again = fresh_copy(model, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters(), strict=True))


def test_fresh_copy_keeps_the_networks_own_initialisation_not_pytorchs_default():
    # A Kaiming-normal (fan_out) convolution, as torchvision's ResNets initialise theirs: std sqrt(2 / (32 * 9)).
    # Conv2d.reset_parameters would draw PyTorch's default (uniform, std 1 / sqrt(3 * 16 * 9)): 0.58 times smaller.
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3), torch.nn.BatchNorm2d(32))
    torch.nn.init.kaiming_normal_(net[0].weight, mode="fan_out", nonlinearity="relu")
    net[1].running_mean.fill_(3.0)
    fresh = fresh_copy(net, seed=0)
    assert float(fresh[0].weight.std()) == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.1)
    assert torch.equal(fresh[1].running_mean, torch.zeros(32)) and torch.equal(fresh[1].weight, torch.ones(32))


def test_fresh_copy_leaves_constant_parameters_constant():
    vit = tiny_vit()  # torchvision initialises the class token to zeros
    assert torch.count_nonzero(vit.class_token) == 0
    assert torch.count_nonzero(fresh_copy(vit, seed=3).class_token) == 0


def test_spread_warning_compares_the_last_spread_with_the_fresh_init_one():
    from tsm_lightning.monitoring import spread_warning

    scalars = {"saliency/tsm/mass_spread": 0.89, "saliency/fresh_init_tsm/mass_spread": 0.85}
    message = spread_warning(scalars, ["tsm"])
    assert message is not None and "0.890 > reference 0.850" in message and "spread_warning=False" in message
    assert spread_warning({**scalars, "saliency/tsm/mass_spread": 0.80}, ["tsm"]) is None  # more compact: fine
    assert spread_warning({**scalars, "saliency/tsm/mass_spread": 0.85}, ["tsm"]) is None  # equal: not more spread
    assert spread_warning({"saliency/tsm/mass_spread": 0.89}, ["tsm"]) is None  # no reference: nothing to judge
    # TSM is judged when present, whatever the order; otherwise the first method with both series.
    both = {**scalars, "saliency/eigencam/mass_spread": 0.5, "saliency/fresh_init_eigencam/mass_spread": 0.85}
    assert "the tsm maps" in spread_warning(both, ["eigencam", "tsm"])
    assert spread_warning(both, ["eigencam"]) is None
    assert "the eigencam maps" in spread_warning({**both, "saliency/eigencam/mass_spread": 0.9}, ["eigencam", "mtsm"])
