"""The fixed-feature DP proxy: its wavelet features, its linear head, and the DP feature centre
that the federation releases for it before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from slide_bags import slide_config
from torch.utils.data import TensorDataset

from federation.algorithms import ALGORITHMS
from federation.algorithms.feature_centre import CLIP, PRIOR
from federation.config import ConfigError, DPConfig, config_from_dict
from federation.data.bags import BagReader
from federation.data.image_clients import ImageClientData
from federation.data.patches import to_model_input
from federation.data.slides import load_slide_clients
from federation.models import create_model
from federation.models.scattering import NUM_FEATURES, ScatteringFeatures, morlet_filters
from federation.privacy.accounting import epsilon_from_history
from federation.privacy.randomness import fixed_secrets_for_tests
from federation.privacy.training import PrivateTraining
from federation.transport.comm import LocalCommunicator

HOSPITALS = ["h_a", "h_b"]


def test_morlet_filters_ignore_a_constant_and_have_unit_l1_norm() -> None:
    real, imag = morlet_filters()
    assert real.shape == imag.shape == (4, 1, 5, 5)
    magnitude = torch.complex(real.double(), imag.double()).abs()
    torch.testing.assert_close(magnitude.sum(dim=(1, 2, 3)), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(real.sum(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(imag.sum(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)


def test_features_are_bounded_and_see_stain_and_texture() -> None:
    features = ScatteringFeatures()
    glass = torch.ones(1, 3, 32, 32)  # white in model input ([-1, 1])
    black = -torch.ones(1, 3, 32, 32)
    stripes = torch.ones(1, 3, 32, 32)
    stripes[..., ::4] = -1.0  # dark vertical lines every 4 px
    out = features(torch.cat([glass, black, stripes]))
    assert out.shape == (3, NUM_FEATURES) == (3, 42)
    assert torch.isfinite(out).all()
    # Optical density lies in [0, log 255] (a black pixel), so every log feature does too.
    low, high = np.log(1e-3), np.log(np.log(255) + 1e-3)
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    mean_density = out[:, :3]
    assert (mean_density[1] > mean_density[2]).all() and (mean_density[2] > mean_density[0]).all()
    wavelets = out[:, 6:].reshape(3, 3, 3, 4)  # patch, scale, channel, orientation
    # Flat pictures have no texture; the stripes answer the horizontal-frequency wavelet most.
    assert torch.allclose(out[0, 6:], out[1, 6:])
    assert (wavelets[2, 0, :, 0] > wavelets[2, 0, :, 2] + 1).all()


def test_the_model_starts_silent_trains_under_dp_and_saves_its_centre() -> None:
    model = create_model("scattering_linear", num_classes=2, in_channels=3, image_size=32,
                         seed=0)
    assert sum(p.numel() for p in model.parameters()) == 86
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    assert not model(x).any()  # zero-initialised head
    assert set(model.state_dict()) == {"centre", "head.weight", "head.bias"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    dp = PrivateTraining(model, optimizer, num_units=8, batch_size=4,
                         settings=DPConfig(noise_multiplier=0.0, max_grad_norm=1.0), label="test")
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1] * 4),
                                             reduction="none")
    dp.backward(loss)
    dp.step()
    assert model.head.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="RGB"):
        create_model("scattering_linear", num_classes=2, in_channels=1)


# ---------------------------------------------------------------------------- feature centre


def _algorithm(bag_cohort, tmp_path: Path, name: str, **overrides):
    root, _ = bag_cohort
    config = config_from_dict(slide_config(root, tmp_path, HOSPITALS, algorithm=name,
                                           **{"model.private": "cnn1",
                                              "model.proxy": "scattering_linear",
                                              **overrides}))
    comm = LocalCommunicator(config.clients)
    return ALGORITHMS[name](config, comm, load_slide_clients(config, comm.owned))


def test_data_without_unit_inputs_refuse_in_one_line() -> None:
    images = ImageClientData("client_0", TensorDataset(torch.zeros(2, 3, 8, 8),
                                                       torch.zeros(2, dtype=torch.int64)),
                             TensorDataset(torch.zeros(1, 3, 8, 8), torch.zeros(1)),
                             num_classes=2, dataset="cifar10", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ConfigError, match="client_0: .*scattering_linear.*patch bags"):
        next(images.unit_inputs())


def _exact_sums(data) -> torch.Tensor:
    """[Σ over training slides of the clipped (slide mean feature − PRIOR), slide count],
    computed here from the bags."""
    features, reader = ScatteringFeatures(), BagReader()
    means = []
    for bag in data.train:
        x = to_model_input(reader.read(bag.path, np.arange(bag.n_patches)))
        means.append(features(x).mean(dim=0).double() - PRIOR)
    means = torch.stack(means)
    means *= torch.clamp(CLIP / means.norm(dim=1, keepdim=True), max=1.0)
    return torch.cat([means.sum(dim=0), torch.tensor([len(means)], dtype=torch.float64)])


def _centre(algorithm, client: int, name: str = "proxy") -> torch.Tensor:
    return algorithm.clients[client].models[name].module.centre


def test_without_dp_a_shared_model_is_centred_on_the_pooled_exact_mean(bag_cohort,
                                                                        tmp_path) -> None:
    algorithm = _algorithm(bag_cohort, tmp_path, "proxyfl", **{"dp.enabled": False})
    algorithm.prepare()
    total = sum(_exact_sums(client.data) for client in algorithm.clients.values())
    expected = (total[:-1] / total[-1] + PRIOR).float()
    for c in algorithm.clients:
        torch.testing.assert_close(_centre(algorithm, c), expected)


def test_a_model_that_never_leaves_is_centred_on_its_own_data(bag_cohort, tmp_path) -> None:
    algorithm = _algorithm(bag_cohort, tmp_path, "regular",
                           **{"model.private": "scattering_linear"})
    algorithm.prepare()
    for c, client in algorithm.clients.items():
        own = _exact_sums(client.data)
        torch.testing.assert_close(_centre(algorithm, c, "private"),
                                   (own[:-1] / own[-1] + PRIOR).float())
    assert not torch.equal(_centre(algorithm, 0, "private"), _centre(algorithm, 1, "private"))


def test_with_dp_the_centre_is_noised_and_counted_in_epsilon(bag_cohort, tmp_path) -> None:
    algorithm = _algorithm(bag_cohort, tmp_path, "proxyfl")
    before = {c: client.models["proxy"].epsilon() for c, client in algorithm.clients.items()}
    assert before == {0: 0.0, 1: 0.0}
    algorithm.prepare()
    total = sum(_exact_sums(client.data) for client in algorithm.clients.values())
    exact = total[:-1] / total[-1] + PRIOR
    centre = _centre(algorithm, 0)
    torch.testing.assert_close(_centre(algorithm, 1), centre)
    # Each hospital adds N(0, (σ C)²) to its sum: the pooled noise per coordinate, in units of
    # σ C / N, is N(0, K) with K = 2 hospitals (42 coordinates: a loose bound on the spread).
    noise = (centre.double() - exact) * total[-1] / (1.0 * CLIP)
    assert 0.6 < float(noise.std() / np.sqrt(2)) < 1.4
    for client in algorithm.clients.values():
        proxy = client.models["proxy"]
        assert proxy.epsilon() == pytest.approx(epsilon_from_history([(1.0, 1.0, 1)],
                                                                     proxy.delta))
        assert proxy.epsilon_after(1) > proxy.epsilon()  # the steps compose on top of it
    # The same configuration and seed, what every peer holds, releases another centre: the
    # noise is the hospitals' secret, so no peer can subtract it (it once came from the seed).
    again = _algorithm(bag_cohort, tmp_path / "again", "proxyfl")
    again.prepare()
    assert not torch.allclose(_centre(again, 0), centre)
    # Given the same secrets (a test-only key), the same centre.
    with fixed_secrets_for_tests(1):
        fixed = [_algorithm(bag_cohort, tmp_path / f"fixed{i}", "proxyfl") for i in range(2)]
    for algorithm in fixed:
        algorithm.prepare()
    torch.testing.assert_close(_centre(fixed[0], 0), _centre(fixed[1], 0), rtol=0, atol=0)
