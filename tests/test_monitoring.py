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
