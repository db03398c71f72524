"""The method table is the one place a method's facts live: names, labels, spectra, dispatch, validation follow it."""

import dataclasses

import pytest
import torch

from tsm_lightning.constants import METHODS
from tsm_lightning.core import (
    METHOD_TABLE,
    TUCKER_METHODS,
    Method,
    compute_maps,
    decompose,
    decomposition_request,
    saliency_maps,
    validate_methods,
)
from tsm_lightning.render import label


def test_the_parsers_names_are_the_tables_names_in_order():
    assert tuple(METHOD_TABLE) == METHODS, (
        "tsm_lightning.constants.METHODS (the torch-free copy the command line reads) must list the names of "
        "tsm_lightning.core.METHOD_TABLE in the same order: add the new method's name there."
    )
    assert all(name == method.name for name, method in METHOD_TABLE.items())


def test_each_methods_facts():
    facts = {name: (m.label, m.spectrum, m.multivector) for name, m in METHOD_TABLE.items()}
    assert facts == {
        "eigencam": ("EigenCAM", "centred", False),
        "tsm": ("TSM", "uncentred", False),
        "multivec_eigencam": ("MV-EigenCAM", "centred", True),
        "mtsm": ("MTSM", "uncentred", True),
    }
    assert TUCKER_METHODS == ("tsm", "mtsm")  # the Tucker view is the uncentred one
    assert [label(name) for name in METHODS] == ["EigenCAM", "TSM", "MV-EigenCAM", "MTSM"]
    assert label("attention") == "CLS attention"
    assert label("something else") == "something else"


def _second_component(spectrum, channel_sum, weighting):
    """A toy method: |P_2|, the second component's projection."""
    return spectrum.projections[:, 1].abs()


@pytest.fixture
def toy(monkeypatch):
    """A method registered by one table entry, as a contributor would add it."""
    method = Method("toy", "Toy", "centred", True, _second_component)
    monkeypatch.setitem(METHOD_TABLE, "toy", method)
    return method


def test_a_registered_method_shows_up_in_validation_labels_request_and_dispatch(toy):
    assert validate_methods(["toy", "tsm", "toy"]) == ("toy", "tsm")
    assert label("toy") == "Toy"
    assert decomposition_request(["toy"], 3) == {"uncentred": False, "centred": True, "num_components": 3}
    feats = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    maps = saliency_maps(feats, ["toy"], normalize=False)
    assert list(maps) == ["toy"]
    xc = feats.reshape(2, 8, -1) - feats.reshape(2, 8, -1).mean(dim=2, keepdim=True)
    u = torch.linalg.svd(xc, full_matrices=False)[0][:, :, 1]  # second left singular vector of Xc
    want = torch.einsum("bc,bcn->bn", u, xc).abs().reshape(2, 4, 5)
    assert torch.allclose(maps["toy"].double(), want, atol=1e-5)


def test_an_unregistered_name_is_refused_with_the_valid_names(toy):
    with pytest.raises(ValueError, match=r"Unknown saliency method\(s\) \['nope'\].*'toy'"):
        validate_methods("nope")


def test_dispatch_goes_through_the_entrys_function(monkeypatch):
    # Swap TSM's function for a spy: compute_maps must call it with TSM's own (uncentred) spectrum.
    calls = []

    def spy(spectrum, channel_sum, weighting):
        calls.append((spectrum.singular_values.shape, weighting))
        return torch.full(spectrum.projections.shape[:1] + spectrum.projections.shape[2:], 7.0)

    monkeypatch.setitem(METHOD_TABLE, "tsm", dataclasses.replace(METHOD_TABLE["tsm"], fn=spy))
    feats = torch.randn(3, 6, 4, 4)
    decomposition = decompose(feats, uncentred=True, centred=False, num_components=None)
    maps = compute_maps(decomposition, ["tsm"], weighting="variance")
    assert calls == [(torch.Size([3, 6]), "variance")]
    assert torch.equal(maps["tsm"], torch.full((3, 4, 4), 7.0))


def test_a_multivector_entry_gets_its_spectrum_cut_to_num_components(monkeypatch):
    seen = []

    def spy(spectrum, channel_sum, weighting):
        seen.append(spectrum.singular_values.shape[1])
        return spectrum.projections[:, 0].abs()

    for name in ("mtsm", "tsm"):
        monkeypatch.setitem(METHOD_TABLE, name, dataclasses.replace(METHOD_TABLE[name], fn=spy))
    decomposition = decompose(torch.randn(2, 6, 4, 4), uncentred=True, centred=False, num_components=None)
    compute_maps(decomposition, ["mtsm", "tsm"], num_components=2)
    assert seen == [2, 6]  # MTSM (multivector) reads K = 2 components; TSM is handed the spectrum as it is
