"""monitoring.py: the fresh-initialisation copy behind the ``fresh_init_<method>`` reference."""

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
        pos = fresh.encoder.pos_embedding if hasattr(fresh, "encoder") else None
        if pos is not None:  # no reset_parameters owns it: redrawn at its own scale
            ratio = float(pos.std() / original["encoder.pos_embedding"].std())
            assert 0.7 < ratio < 1.3
        again = fresh_copy(model, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters(), strict=True))


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
