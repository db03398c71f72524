import math

import pytest
import torch
from conftest import blob_features
from helpers import SiameseNet, tiny_cnn
from torch import nn

from tsm_lightning import explain, saliency_maps
from tsm_lightning.metrics import (
    average_drop,
    average_gain,
    average_increase,
    blur_baseline,
    default_embed_fn,
    deletion_auc,
    deletion_curve,
    effective_rank,
    embedding_drop,
    embedding_gain,
    embedding_increase,
    embedding_spread,
    energy_in_mask,
    faithfulness_metrics,
    gini,
    insertion_auc,
    insertion_curve,
    map_entropy,
    map_metrics,
    mask_iou,
    mass_spread,
    pearson,
    pointing_game,
    predicted_class_score,
    random_maps,
    saliency_rank,
    score_deletion_auc,
    score_insertion_auc,
    score_metrics,
    spectral_concentration,
    summarize,
)


def flat_embed(x: torch.Tensor) -> torch.Tensor:
    """The identity embedding: cosine similarities of perturbed images have closed forms."""
    return x.flatten(1)


class ConstantNet(nn.Module):
    """A model that ignores its input."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


def square_masks(batch: int = 3, size: int = 8) -> torch.Tensor:
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    for b in range(batch):
        masks[b, b : b + 3, 2 * b % (size - 2) : 2 * b % (size - 2) + 2] = True
    return masks


def per_image(fn, *tensors, **kwargs) -> torch.Tensor:
    return torch.cat([fn(*(t[i : i + 1] for t in tensors), **kwargs) for i in range(tensors[0].shape[0])])


# ----------------------------------------------------------------------------------------------------------------
# Spectral concentration
# ----------------------------------------------------------------------------------------------------------------


def test_spectral_concentration_known_values():
    u, v = torch.rand(6) + 0.1, torch.rand(9) + 0.1
    rank_one = torch.outer(u, v).reshape(1, 6, 3, 3)
    identity = torch.eye(4).reshape(1, 4, 2, 2)  # four equal singular values
    feats = torch.cat([identity, torch.zeros(1, 4, 2, 2)])
    assert spectral_concentration(rank_one).item() == pytest.approx(1.0, abs=1e-6)
    assert spectral_concentration(rank_one, centred=True).item() == pytest.approx(1.0, abs=1e-6)
    out = spectral_concentration(feats)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert out.tolist() == pytest.approx([0.25, 0.0], abs=1e-6)  # all-zero features: 0, not NaN


def test_spectral_concentration_batched_equals_loop_and_flags_nonfinite():
    feats = blob_features(batch=5, channels=12, size=5)
    for centred in (False, True):
        batched = spectral_concentration(feats, centred=centred)
        assert torch.allclose(batched, per_image(spectral_concentration, feats, centred=centred), atol=1e-6)
        assert ((batched > 0) & (batched <= 1)).all()
    feats[2, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        out = spectral_concentration(feats)
    assert torch.isnan(out).tolist() == [False, False, True, False, False]


# ----------------------------------------------------------------------------------------------------------------
# Map complexity
# ----------------------------------------------------------------------------------------------------------------


def test_entropy_and_gini_known_values():
    one_hot = torch.zeros(4, 4)
    one_hot[1, 2] = 1.0
    two = torch.zeros(4, 4)
    two[0, :2] = 0.7  # two equal pixels: entropy log 2 / log 16 = 1/4
    half = torch.zeros(2, 2)
    maps = torch.stack([torch.ones(4, 4), one_hot, torch.full((4, 4), 0.3), torch.zeros(4, 4), two])
    assert map_entropy(maps).tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0, 0.25], abs=1e-6)
    # two: sorted mass shares 1/2 at k = 15, 16 -> G = 1 - 2 * (1.5 + 0.5) / 32 = 7/8, rescaled by 16/15
    assert gini(maps).tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0, 14 / 15])
    half[1] = 1.0  # sorted [0, 0, 1, 1]: G = 1 - 2 * (1.5 + 0.5) / 8 = 0.5, rescaled by 4 / 3
    assert gini(half[None]).item() == pytest.approx(2 / 3)


def test_uniform_map_has_maximal_entropy_and_minimal_gini():
    maps = torch.rand(6, 5, 7)
    uniform = torch.full((1, 5, 7), 0.5)
    assert (map_entropy(maps) < map_entropy(uniform)).all() and map_entropy(uniform).item() == 1.0
    assert (gini(maps) > gini(uniform)).all() and gini(uniform).item() == 0.0


def test_complexity_batched_equals_loop_and_no_nan():
    maps = torch.cat([torch.rand(4, 6, 6), torch.zeros(1, 6, 6), torch.full((1, 6, 6), float("nan"))])
    for fn in (map_entropy, gini):
        out = fn(maps)
        assert torch.equal(out, per_image(fn, maps))
        assert torch.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()


# ----------------------------------------------------------------------------------------------------------------
# Stability and agreement
# ----------------------------------------------------------------------------------------------------------------


def test_pearson_known_values_and_constant_maps():
    a = torch.rand(3, 5, 5)
    assert pearson(a, a).tolist() == [1.0, 1.0, 1.0]
    assert pearson(a, 1 - a).tolist() == pytest.approx([-1.0] * 3, abs=1e-6)
    assert pearson(a, 3 * a + 2).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    c = torch.full((1, 5, 5), 0.4)
    assert pearson(c, c.clone()).item() == 1.0
    assert pearson(c, torch.zeros(1, 5, 5)).item() == 0.0
    assert pearson(c, a[:1]).item() == 0.0 and pearson(a[:1], c).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        pearson(a, a[:, :4])


def test_pearson_matches_corrcoef_and_loop():
    a, b = torch.rand(5, 6, 7), torch.rand(5, 6, 7)
    expected = torch.stack(
        [torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] for x, y in zip(a, b, strict=True)]
    )
    assert torch.allclose(pearson(a, b), expected, atol=1e-6)
    assert torch.equal(pearson(a, b), per_image(pearson, a, b))


# ----------------------------------------------------------------------------------------------------------------
# Localization
# ----------------------------------------------------------------------------------------------------------------


def test_map_equal_to_mask_scores_one_and_disjoint_scores_zero():
    masks = square_masks()
    maps = masks.float()
    for fn in (pointing_game, energy_in_mask, mask_iou):
        assert fn(maps, masks).tolist() == [1.0, 1.0, 1.0]
        assert fn(1 - maps, masks).tolist() == [0.0, 0.0, 0.0]


def test_localization_hand_values():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # 4 of 16 pixels
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 3, 3], m[0, 0, 1] = 0.6, 1.0, 0.4
    assert pointing_game(m, mask).item() == 0.0
    assert energy_in_mask(m, mask).item() == pytest.approx(0.5)
    assert mask_iou(m, mask, threshold=0.5).item() == pytest.approx(1 / 5)  # {(0,0), (3,3)} vs 4 mask pixels
    assert mask_iou(m, mask, threshold=0.3).item() == pytest.approx(2 / 5)
    assert mask_iou(m * 0.5, mask, threshold=0.5).item() == pytest.approx(1 / 5)  # relative to the map's max


def test_constant_maps_score_the_area_fraction_without_nan():
    masks = square_masks()
    area = masks.float().mean(dim=(1, 2))
    for maps in (torch.full((3, 8, 8), 0.7), torch.zeros(3, 8, 8)):
        for fn in (pointing_game, energy_in_mask, mask_iou):
            assert torch.allclose(fn(maps, masks), area)


def test_empty_masks_are_nan_excluded_and_counted():
    masks = square_masks(4)
    masks[1] = False
    masks[3] = False
    maps = torch.rand(4, 8, 8)
    per = map_metrics({"tsm": maps}, masks=masks)
    for name in ("pointing_game", "energy_in_mask", "mask_iou"):
        assert torch.isnan(per["tsm"][name]).tolist() == [False, True, False, True]
    summary = summarize(per)["tsm"]
    assert summary["energy_in_mask_excluded"] == 2.0 and summary["mask_iou_excluded"] == 2.0
    assert summary["energy_in_mask"] == pytest.approx(per["tsm"]["energy_in_mask"][[0, 2]].mean().item())
    assert "entropy_excluded" not in summary


def test_masks_are_resized_to_the_maps_by_nearest_neighbour():
    masks = square_masks()
    big = masks.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # (3, 32, 32)
    maps = torch.rand(3, 8, 8)
    for fn in (pointing_game, energy_in_mask, mask_iou):
        assert torch.equal(fn(maps, big), fn(maps, masks))
    for variant in (masks.float(), masks.to(torch.uint8) * 255, masks[:, None]):
        assert torch.equal(energy_in_mask(maps, variant), energy_in_mask(maps, masks))
    with pytest.raises(ValueError, match="masks hold 2 images"):
        energy_in_mask(maps, masks[:2])


def test_localization_batched_equals_loop():
    maps, masks = torch.rand(5, 8, 8), square_masks(5)
    masks[4] = False
    for fn in (pointing_game, energy_in_mask, mask_iou):
        torch.testing.assert_close(fn(maps, masks), per_image(fn, maps, masks), rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------------------------
# Random maps, saliency order, blur
# ----------------------------------------------------------------------------------------------------------------


def test_random_maps_deterministic_and_leave_global_rng_alone():
    like = torch.zeros(4, 20, 24)
    state = torch.random.get_rng_state()
    a = random_maps(like, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, random_maps(like, seed=3))
    assert not torch.equal(a, random_maps(like, seed=4))
    assert torch.equal(random_maps(like[:1], seed=3), a[:1])  # image b's map does not depend on the batch size
    assert a.shape == (4, 20, 24) and a.dtype == torch.float32 and a.min() == 0 and a.max() == 1


def test_saliency_rank_breaks_ties_by_pixel_index():
    m = torch.tensor([[[0.5, 1.0, 0.5], [0.2, 1.0, 0.0]]])
    assert saliency_rank(m).tolist() == [[2, 0, 3, 4, 1, 5]]
    assert saliency_rank(torch.zeros(2, 3, 3)).tolist() == [list(range(9))] * 2


def test_blur_keeps_constants_and_smooths():
    const = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(blur_baseline(const), const, atol=1e-6)
    noise = torch.randn(2, 3, 32, 32)  # default sigma: 2 px
    blurred = blur_baseline(noise)
    assert blurred.shape == noise.shape and blurred.std() < 0.3 * noise.std()


# ----------------------------------------------------------------------------------------------------------------
# Embedding faithfulness
# ----------------------------------------------------------------------------------------------------------------


def test_embedding_drop_known_values():
    images = torch.ones(2, 3, 4, 4)
    maps = torch.ones(2, 4, 4)
    maps[1, :2] = 0  # keeps half the pixels: cos(1, m) = sqrt(1 / 2)
    assert embedding_drop(flat_embed, images, maps).tolist() == pytest.approx([0.0, 1 - math.sqrt(0.5)], abs=1e-6)


def test_embedding_drop_is_zero_for_an_all_ones_map():
    model = SiameseNet()
    images = torch.randn(3, 3, 16, 16)
    out = embedding_drop(default_embed_fn(model), images, torch.ones(3, 4, 4))
    assert out.abs().max() < 1e-6 and out.shape == (3,) and not out.requires_grad


def test_identity_embedding_curves_have_closed_forms():
    images = torch.ones(2, 3, 4, 4)
    fractions, curves = deletion_curve(flat_embed, images, torch.rand(2, 4, 4), steps=4, baseline="zeros")
    assert fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert torch.allclose(curves, torch.sqrt(1 - fractions).expand(2, -1).to(curves.dtype), atol=1e-7)
    _, curves = insertion_curve(flat_embed, images, torch.rand(2, 4, 4), steps=4, baseline="zeros")
    assert torch.allclose(curves, torch.sqrt(fractions).expand(2, -1).to(curves.dtype), atol=1e-7)


def test_deletion_and_insertion_follow_the_saliency_order():
    images = torch.zeros(1, 3, 8, 8)
    images[0, :, 2:4, 4:6] = 1.0  # the object: 4 pixels
    good = (images[:, 0] > 0).float()
    kwargs = {"steps": 8, "baseline": "zeros"}
    # Good map: the object goes first, so the similarity is 0 from the first step on.
    assert deletion_auc(flat_embed, images, good, **kwargs).item() == pytest.approx(1 / 16)
    assert deletion_auc(flat_embed, images, 1 - good, **kwargs).item() == pytest.approx(15 / 16)
    assert insertion_auc(flat_embed, images, good, **kwargs).item() == pytest.approx(15 / 16)
    assert insertion_auc(flat_embed, images, 1 - good, **kwargs).item() == pytest.approx(1 / 16)


def test_model_ignoring_its_input_gives_flat_curves():
    embed = default_embed_fn(ConstantNet())
    images = torch.randn(3, 3, 12, 12)
    maps = random_maps(torch.zeros(3, 6, 6), seed=1)
    for curve_fn in (deletion_curve, insertion_curve):
        _, curves = curve_fn(embed, images, maps, steps=5)
        assert torch.allclose(curves, torch.ones_like(curves), atol=1e-6)
    per = faithfulness_metrics(embed, images, {"tsm": maps}, steps=5)
    for method in ("tsm", "random"):
        assert torch.allclose(per[method]["deletion_auc"], torch.ones(3), atol=1e-6)
        assert torch.allclose(per[method]["insertion_auc"], torch.ones(3), atol=1e-6)
        assert per[method]["embedding_drop"].abs().max() < 1e-6


def test_faithfulness_batched_equals_standalone_per_image_calls():
    model = SiameseNet()
    images = torch.randn(3, 3, 16, 16)
    maps = explain(model, images, "backbone.5", ["tsm", "eigencam"])
    embed = default_embed_fn(model, layer="backbone")
    per = faithfulness_metrics(embed, images, maps, steps=4, seed=5)
    rand = random_maps(maps["tsm"].new_zeros(3, 16, 16), seed=5)
    for name, m in [*maps.items(), ("random", rand)]:
        loop = {
            "embedding_drop": per_image(lambda x, y: embedding_drop(embed, x, y), images, m),
            "deletion_auc": per_image(lambda x, y: deletion_auc(embed, x, y, steps=4), images, m),
            "insertion_auc": per_image(lambda x, y: insertion_auc(embed, x, y, steps=4), images, m),
        }
        if name != "random":
            for key, fn in (("embedding_increase", embedding_increase), ("embedding_gain", embedding_gain)):
                loop[key] = per_image(lambda x, y, r, fn=fn: fn(embed, x, y, reference_maps=r), images, m, rand)
        assert set(per[name]) == set(loop)
        for key, expected in loop.items():
            assert torch.allclose(per[name][key], expected, atol=1e-5), (name, key)


def test_embedding_increase_and_gain_against_a_reference_map():
    images = torch.ones(2, 3, 4, 4)
    full, half = torch.ones(2, 4, 4), torch.ones(2, 4, 4)
    half[:, :2] = 0  # s_r = sqrt(1/2)
    assert embedding_increase(flat_embed, images, full, reference_maps=half).tolist() == [100.0, 100.0]
    assert embedding_gain(flat_embed, images, full, reference_maps=half).tolist() == pytest.approx([100.0] * 2)
    assert embedding_increase(flat_embed, images, half, reference_maps=full).tolist() == [0.0, 0.0]
    assert embedding_gain(flat_embed, images, half, reference_maps=half).tolist() == [0.0, 0.0]


def test_max_batch_chunking_gives_identical_results():
    model = SiameseNet()
    images = torch.randn(2, 3, 16, 16)
    maps = {"tsm": torch.rand(2, 4, 4), "mtsm": torch.rand(2, 4, 4)}
    embed = default_embed_fn(model)
    calls = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return embed(x)

    big = faithfulness_metrics(counting, images, maps, steps=4, max_batch=1000)
    total = 2 * (2 + 3 * (2 * 4 - 1))  # originals + baselines + per map: masked image and 3 + 3 inner curve points
    assert sum(calls) == total and len(calls) == 2  # the reference pass, then everything else in one pass
    calls.clear()
    small = faithfulness_metrics(counting, images, maps, steps=4, max_batch=5)
    assert max(calls) <= 5 and sum(calls) == total
    for method in big:
        for key in big[method]:
            assert torch.allclose(big[method][key], small[method][key], atol=1e-6), (method, key)


def test_model_modes_and_buffers_restored_after_embedding_metrics():
    model = SiameseNet()
    model.backbone.train()
    model.head.eval()
    model.backbone[1].eval()  # a frozen BatchNorm inside a training backbone
    modes = {name: m.training for name, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    images, maps = torch.randn(2, 3, 16, 16), {"tsm": torch.rand(2, 4, 4)}
    faithfulness_metrics(default_embed_fn(model), images, maps, steps=3)
    faithfulness_metrics(default_embed_fn(model, layer="backbone.5"), images, maps, steps=3)
    score_metrics(predicted_class_score(model, images), images, maps, steps=3)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_default_embed_fn_outputs():
    model = SiameseNet()
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(default_embed_fn(model)(x), model(x))
        assert torch.allclose(default_embed_fn(model, layer="backbone")(x), model.backbone(x))
        pooled = model.backbone[:6](x).mean(dim=(2, 3))
        assert torch.allclose(default_embed_fn(model, layer="backbone.5")(x), pooled)
        assert default_embed_fn(model, layer="backbone.5", pool=False)(x).shape == (2, 16 * 8 * 8)
        pair = default_embed_fn(model, forward_fn=lambda m, images: (m(images), "extra"))(x)
        assert torch.allclose(pair, model(x))
    with pytest.raises(ValueError, match="No layer named"):
        default_embed_fn(model, layer="backbone.99")


def test_constant_maps_give_finite_faithfulness():
    model = tiny_cnn()
    images = torch.randn(2, 3, 12, 12)
    maps = {"flat": torch.zeros(2, 3, 3), "half": torch.full((2, 3, 3), 0.5)}
    per = faithfulness_metrics(default_embed_fn(model), images, maps, steps=3)
    assert all(torch.isfinite(v).all() for metrics in per.values() for v in metrics.values())


def test_faithfulness_leaves_global_rng_alone_and_checks_input():
    embed = default_embed_fn(tiny_cnn())
    images, maps = torch.randn(2, 3, 8, 8), {"tsm": torch.rand(2, 8, 8)}
    state = torch.random.get_rng_state()
    faithfulness_metrics(embed, images, maps, steps=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="steps"):
        deletion_auc(embed, images, torch.rand(2, 8, 8), steps=0)
    with pytest.raises(ValueError, match="Unknown baseline"):
        deletion_auc(embed, images, torch.rand(2, 8, 8), baseline="noise")
    with pytest.raises(ValueError, match="maps hold 1 images"):
        embedding_drop(embed, images, torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="reserved"):
        faithfulness_metrics(embed, images, {"random": torch.rand(2, 8, 8)})


# ----------------------------------------------------------------------------------------------------------------
# Classic score metrics
# ----------------------------------------------------------------------------------------------------------------


def hand_score(x: torch.Tensor) -> torch.Tensor:
    return 0.5 + x[:, 0].mean(dim=(1, 2)) - x[:, 1].mean(dim=(1, 2))


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([0.3, 0.0, 0.2, 0.4])
    q = torch.tensor([0.0, 0.3, 0.0, 0.0])
    c = torch.tensor([0.5, 0.5, 1.0, 0.0])
    images = torch.zeros(4, 3, 6, 6)
    images[:, 0] = p[:, None, None]
    images[:, 1] = q[:, None, None]
    return images, c[:, None, None].expand(4, 6, 6).clone()


def test_average_drop_increase_gain_known_values():
    images, maps = hand_case()
    # y = [0.8, 0.2, 0.7, 0.9], o = [0.65, 0.35, 0.7, 0.5]
    drop, increase, gain = (fn(hand_score, images, maps) for fn in (average_drop, average_increase, average_gain))
    assert drop.tolist() == pytest.approx([18.75, 0.0, 0.0, 400 / 9], abs=1e-4)
    assert increase.tolist() == [0.0, 100.0, 0.0, 0.0]
    assert gain.tolist() == pytest.approx([0.0, 18.75, 0.0, 0.0], abs=1e-4)
    summary = summarize(score_metrics(hand_score, images, {"m": maps}, steps=2))["m"]
    assert summary["average_drop"] == pytest.approx((18.75 + 400 / 9) / 4, abs=1e-4)
    assert summary["average_increase"] == 25.0
    assert summary["average_gain"] == pytest.approx(18.75 / 4, abs=1e-4)


def test_score_curves_known_values_and_loop():
    images = torch.ones(3, 3, 4, 4)
    maps = torch.rand(3, 4, 4)

    def mean_score(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))

    for fn in (score_deletion_auc, score_insertion_auc):
        out = fn(mean_score, images, maps, steps=4, baseline="zeros")
        assert out.tolist() == pytest.approx([0.5] * 3)  # a linear curve from 1 to 0 (or 0 to 1)
    images, maps = hand_case()
    for fn in (average_drop, average_increase, average_gain, score_deletion_auc, score_insertion_auc):
        assert torch.allclose(
            fn(hand_score, images, maps), per_image(lambda x, m, fn=fn: fn(hand_score, x, m), images, maps)
        )


def test_predicted_class_score_uses_the_clean_class():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    images, maps = torch.randn(4, 3, 8, 8), torch.rand(4, 8, 8)
    score_fn = predicted_class_score(model, images)
    with torch.no_grad():
        probs = model(images).softmax(dim=1)
        target = probs.argmax(dim=1)
        masked = model(images * maps[:, None]).softmax(dim=1).gather(1, target[:, None])[:, 0]
    y = probs.max(dim=1).values
    assert torch.allclose(score_fn(images, index=torch.arange(4)), y)
    assert torch.allclose(score_fn(images[[2, 0]], index=torch.tensor([2, 0])), y[[2, 0]])
    expected = torch.clamp(y - masked, min=0) / y * 100
    assert torch.allclose(average_drop(score_fn, images, maps, max_batch=3), expected, atol=1e-4)
    per = score_metrics(score_fn, images, {"m": maps}, steps=3, max_batch=5)
    assert torch.allclose(per["m"]["average_drop"], expected, atol=1e-4)
    assert set(per) == {"m", "random"}


# ----------------------------------------------------------------------------------------------------------------
# Convenience layer
# ----------------------------------------------------------------------------------------------------------------


def test_map_metrics_keys_stability_and_agreement():
    maps = {"tsm": torch.rand(3, 8, 8), "eigencam": torch.rand(3, 8, 8)}
    feats = blob_features(batch=3, channels=8, size=4)
    per = map_metrics(maps, masks=square_masks(), previous=maps, first={"tsm": 1 - maps["tsm"]}, features=feats)
    assert set(per) == {"tsm", "eigencam", "features"}
    assert set(per["tsm"]) == {
        "entropy", "gini", "mass_spread", "pointing_game", "energy_in_mask", "mask_iou",
        "stability_prev", "stability_first", "agreement_eigencam",
    }  # fmt: skip
    assert "stability_first" not in per["eigencam"]
    assert per["tsm"]["stability_prev"].tolist() == [1.0, 1.0, 1.0]  # identical maps
    assert per["tsm"]["stability_first"].tolist() == pytest.approx([-1.0] * 3, abs=1e-6)
    assert torch.equal(per["tsm"]["agreement_eigencam"], pearson(maps["tsm"], maps["eigencam"]))
    assert torch.equal(per["eigencam"]["agreement_tsm"], per["tsm"]["agreement_eigencam"])
    assert torch.equal(per["tsm"]["mass_spread"], mass_spread(maps["tsm"]))
    assert torch.allclose(per["features"]["spectral_concentration_centred"], spectral_concentration(feats, True))
    assert all(v.shape == (3,) and v.dtype == torch.float32 for d in per.values() for v in d.values())
    with pytest.warns(RuntimeWarning, match="stability_prev"):
        per = map_metrics(maps, previous={"tsm": torch.rand(3, 4, 4)})
    assert "stability_prev" not in per["tsm"]
    with pytest.raises(ValueError, match="reserved"):
        map_metrics({"features": torch.rand(1, 4, 4)})


def test_map_metrics_on_real_maps_prefers_the_object():
    feats = blob_features(batch=4, channels=16, size=7)
    maps = saliency_maps(feats, ["tsm", "eigencam"])
    masks = feats.mean(dim=1) > 1.0  # the bright blob
    per = map_metrics(maps, masks=masks)
    for name in maps:
        assert per[name]["pointing_game"].tolist() == [1.0] * 4
        assert (per[name]["energy_in_mask"] > masks.float().mean(dim=(1, 2))).all()


def test_summarize_means_and_counts():
    per = {"a": {"x": torch.tensor([1.0, float("nan"), 3.0]), "y": torch.tensor([float("nan")] * 2)}}
    summary = summarize(per)
    assert summary["a"]["x"] == 2.0 and summary["a"]["x_excluded"] == 1.0
    assert math.isnan(summary["a"]["y"]) and summary["a"]["y_excluded"] == 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda_match_cpu():
    model = SiameseNet()
    images = torch.randn(3, 3, 16, 16)
    maps = explain(model, images, "backbone.5", ["tsm", "eigencam"])
    masks = square_masks(3, 16)
    cpu = {
        **map_metrics(maps, masks=masks, previous=maps),
        **{f"f_{k}": v for k, v in faithfulness_metrics(default_embed_fn(model), images, maps, steps=3).items()},
    }
    model.cuda()
    images, masks = images.cuda(), masks.cuda()
    maps = {k: v.cuda() for k, v in maps.items()}
    gpu = {
        **map_metrics(maps, masks=masks, previous=maps),
        **{f"f_{k}": v for k, v in faithfulness_metrics(default_embed_fn(model), images, maps, steps=3).items()},
    }
    for method, metrics in cpu.items():
        for key, value in metrics.items():
            assert gpu[method][key].device.type == "cuda"
            assert torch.allclose(gpu[method][key].cpu(), value, atol=1e-4), (method, key)


def test_collapse_indicators_known_values():
    g = torch.Generator().manual_seed(0)
    collapsed = torch.ones(16, 8) + 1e-9 * torch.randn(16, 8, generator=g)
    assert float(embedding_spread(collapsed)) < 1e-6
    isotropic = torch.randn(4096, 8, generator=g)
    assert float(embedding_spread(isotropic)) == pytest.approx(8**-0.5, rel=0.05)
    line = torch.randn(32, 1, generator=g) * torch.randn(1, 8, generator=g)  # rank one: a line through 0
    assert float(effective_rank(line)) == pytest.approx(1.0, abs=1e-3)
    assert 7.5 < float(effective_rank(isotropic)) <= 8.0
    assert float(effective_rank(torch.ones(5, 3))) == 0.0
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        effective_rank(torch.ones(3))
