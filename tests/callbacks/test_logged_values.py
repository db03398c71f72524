"""The numbers the monitor logs, recomputed independently: a tag that exists is not a value that is right.

A real Trainer fits a tiny model with a 12-image probe whose masks all differ, of which the pictures show 3. A
second callback, after the monitor, captures the monitored layer itself at the same steps (a plain forward hook);
from those features the maps are recomputed with the numpy SVD references of ``benchmarks/reference_paths.py`` and every
logged scalar with numpy below: means over **all** probe images, chance from **all** masks, a random-map series
that never changes, ``stability_prev`` against the previous run and ``stability_first`` against the first.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from reference_paths import svd_tsm_mtsm

from tests.lightning_helpers import TinySimSiam, loader, trainer_kwargs
from tsm_lightning import DisplayOptions, Probe, SaliencyMonitor
from tsm_lightning.metrics import random_maps
from tsm_lightning.monitoring import fresh_copy

LAYER = "backbone.5"
SIZE, COUNT, SHOWN, EVERY, STEPS = 16, 12, 3, 2, 6


class RecordingSink:
    """A user's own sink: keeps every scalar it is given, by step."""

    def __init__(self) -> None:
        self.scalars: dict[int, dict[str, float]] = {}
        self.pictures: dict[int, set[str]] = {}

    def write(self, pictures, scalars, step):
        self.scalars[step] = dict(scalars)
        self.pictures[step] = set(pictures)


class FeatureTap(Callback):
    """Captures the monitored layer on the probe at the monitor's steps, by hand: eval mode, a hook, no_grad."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.features: dict[int, torch.Tensor] = {}

    def _tap(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step in self.features or (step % EVERY and step != STEPS):
            return
        seen = []
        handle = pl_module.get_submodule(LAYER).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                pl_module.backbone(self.images)
        finally:
            handle.remove()
            for module, mode in modes.items():
                module.train(mode)
        self.features[step] = seen[0].float()

    def on_train_start(self, trainer, pl_module):
        self.initial = copy.deepcopy(pl_module.backbone)  # the network at the monitor's first run
        self._tap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._tap(trainer, pl_module)


def _masks() -> torch.Tensor:
    # Rectangles of different sizes and places, so that the first 3 masks are not typical of all 12.
    masks = torch.zeros(COUNT, SIZE, SIZE, dtype=torch.bool)
    for i in range(COUNT):
        top, left, side = (i * 5) % 9, (i * 3) % 7, 3 + (i % 4) * 3
        masks[i, top : top + side, left : left + side] = True
    return masks


def _upsampled(maps: np.ndarray) -> np.ndarray:
    up = F.interpolate(torch.from_numpy(maps)[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def _pointing(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    # The map's maximum inside the mask; tied maxima share the credit.
    hits = []
    for m, inside in zip(maps, masks, strict=True):
        top = m == m.max()
        hits.append((top & inside).sum() / top.sum())
    return np.array(hits)


def _energy(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.array([m[inside].sum() / m.sum() for m, inside in zip(maps, masks, strict=True)])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    # Mean over images of the Pearson correlation of the flattened maps.
    return float(np.mean([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b, strict=True)]))


def _spread(maps: np.ndarray) -> np.ndarray:
    # Standard deviation of the mass's position (pixel centres in (0, 1)) over a uniform map's, per map.
    out = []
    for m in maps:
        p = np.clip(m, 0, None) / np.clip(m, 0, None).sum()
        h, w = p.shape
        ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
        py, px = p.sum(axis=1), p.sum(axis=0)
        var = (py * ys**2).sum() - (py * ys).sum() ** 2 + (px * xs**2).sum() - (px * xs).sum() ** 2
        out.append(np.sqrt(var / ((1 - 1 / h**2) / 12 + (1 - 1 / w**2) / 12)))
    return np.array(out)


def _entropy(maps: np.ndarray) -> np.ndarray:
    # Shannon entropy of the map as a distribution over pixels, over log N.
    p = maps.reshape(len(maps), -1) / maps.reshape(len(maps), -1).sum(axis=1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1) / np.log(p.shape[1])


def _gini(maps: np.ndarray) -> np.ndarray:
    # Hurley & Rickard's Gini index of the sorted values, rescaled by N / (N - 1).
    c = np.sort(maps.reshape(len(maps), -1), axis=1)
    n = c.shape[1]
    k = np.arange(1, n + 1)
    g = 1 - 2 * ((c / c.sum(axis=1, keepdims=True)) * (n - k + 0.5) / n).sum(axis=1)
    return g * n / (n - 1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("values")
    images = torch.randn(COUNT, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    masks = _masks()
    sink, tap = RecordingSink(), FeatureTap(images)
    monitor = SaliencyMonitor(
        Probe(images, masks),
        layer=LAYER,
        methods=["tsm"],
        every_n_steps=EVERY,
        display=DisplayOptions(images=SHOWN),
        sinks=[sink],
        strict=True,
    )
    seed_everything(0)
    model = TinySimSiam(lr=0.2)
    trainer = Trainer(callbacks=[monitor, tap], **trainer_kwargs(tmp_path, logger=False, max_steps=STEPS))
    trainer.fit(model, loader())
    tsm = {step: svd_tsm_mtsm(features.double().numpy())[0] for step, features in tap.features.items()}
    return sink.scalars, tsm, masks.numpy(), tap.initial, images


@pytest.fixture(scope="module")
def logged(fitted):
    return fitted[:3]


def test_every_run_reached_the_users_sink(logged):
    scalars, tsm, _ = logged
    assert sorted(scalars) == sorted(tsm) == [0, 2, 4, 6]


def test_localization_is_the_mean_over_every_probe_image(logged):
    scalars, tsm, masks = logged
    for step, maps in tsm.items():
        full = _upsampled(maps)
        pointing, energy = _pointing(full, masks), _energy(full, masks)
        assert scalars[step]["saliency/tsm/pointing_game"] == pytest.approx(pointing.mean(), abs=1e-6)
        assert scalars[step]["saliency/tsm/energy_in_mask"] == pytest.approx(energy.mean(), abs=1e-5)
    # The fixture can tell the whole probe from the shown images: their means differ.
    last = _upsampled(tsm[STEPS])
    assert abs(_energy(last, masks).mean() - _energy(last[:SHOWN], masks[:SHOWN]).mean()) > 1e-3


def test_chance_is_the_mean_area_of_every_mask(logged):
    scalars, _, masks = logged
    area = masks.reshape(COUNT, -1).mean(axis=1)
    assert area.mean() != pytest.approx(area[:SHOWN].mean(), abs=1e-3)  # the fixture tells them apart
    for values in scalars.values():
        assert values["saliency/chance/pointing_game"] == pytest.approx(area.mean(), abs=1e-6)
        assert values["saliency/chance/energy_in_mask"] == pytest.approx(area.mean(), abs=1e-6)


def test_random_reference_is_one_fixed_map_over_every_mask(logged):
    scalars, _, masks = logged
    series = [values["saliency/random/pointing_game"] for _, values in sorted(scalars.items())]
    assert len(set(series)) == 1  # drawn once, never redrawn
    fixed = random_maps(torch.from_numpy(masks).float(), seed=0).numpy()
    assert series[0] == pytest.approx(_pointing(fixed, masks).mean(), abs=1e-6)
    assert _pointing(fixed, masks).mean() != pytest.approx(_pointing(fixed[:SHOWN], masks[:SHOWN]).mean(), abs=1e-3)


def test_stability_is_against_the_previous_and_the_first_run(logged):
    scalars, tsm, _ = logged
    steps = sorted(tsm)
    assert "saliency/tsm/stability_prev" not in scalars[0]
    for previous, step in itertools.pairwise(steps):
        assert scalars[step]["saliency/tsm/stability_prev"] == pytest.approx(
            _pearson(tsm[step], tsm[previous]), abs=1e-5
        )
        assert scalars[step]["saliency/tsm/stability_first"] == pytest.approx(_pearson(tsm[step], tsm[0]), abs=1e-5)
    # The maps moved: previous and first differ at the last run, so the two series can be told apart.
    assert abs(_pearson(tsm[STEPS], tsm[steps[-2]]) - _pearson(tsm[STEPS], tsm[0])) > 1e-3


def test_spread_is_the_mean_over_every_probe_image(logged):
    scalars, tsm, _ = logged
    for step, maps in tsm.items():
        assert scalars[step]["saliency/tsm/mass_spread"] == pytest.approx(_spread(maps).mean(), abs=1e-5)
    assert abs(_spread(tsm[STEPS]).mean() - _spread(tsm[STEPS][:SHOWN]).mean()) > 1e-3  # shown != whole probe


def test_fresh_init_references_are_those_of_a_freshly_initialised_copy(fitted):
    # The monitor's copy: the monitored network (the backbone) at its first run, redrawn under seed + 1 (the
    # monitor's seed is 0).
    scalars, tsm, _, initial, images = fitted
    fresh = fresh_copy(initial, 1).eval()
    seen = []
    fresh.get_submodule(LAYER.split(".", 1)[1]).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        fresh(images)
    maps = svd_tsm_mtsm(seen[0].double().numpy())[0]
    for values in scalars.values():  # one value, at every run
        assert values["saliency/fresh_init_tsm/mass_spread"] == pytest.approx(_spread(maps).mean(), abs=1e-5)
        assert values["saliency/fresh_init_tsm/stability_first"] == pytest.approx(_pearson(maps, tsm[0]), abs=1e-5)
        assert values["saliency/fresh_init_tsm/entropy"] == pytest.approx(_entropy(maps).mean(), abs=1e-5)
        assert values["saliency/fresh_init_tsm/gini"] == pytest.approx(_gini(maps).mean(), abs=1e-5)
    assert _spread(maps).mean() != pytest.approx(_spread(tsm[0]).mean(), abs=1e-3)  # not the model's own maps
