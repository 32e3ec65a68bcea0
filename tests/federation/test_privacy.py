"""Tests of federation.privacy: same guarantee for every mechanism, noise, accounting."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from privacy_reference import (
    clipped_sum,
    dml_loss,
    flat_grad,
    images,
    poisson_batches,
    private_training,
    small_gn_cnn,
    unit_grads,
)
from torch import nn
from torch.utils.data import TensorDataset

from federation.config import DPConfig
from federation.models import create_model
from federation.privacy.accounting import (
    RDP_ORDERS,
    _rdp_of_one_step,
    default_delta,
    epsilon_from_history,
)
from federation.privacy.clipping import MECHANISMS
from federation.privacy.training import PrivateTraining, dp_batch_size


def _small_mlp() -> nn.Module:
    return create_model("mlp", num_classes=10, hidden=(16,), seed=1)


MODELS = {
    "mlp": (lambda: create_model("mlp", num_classes=10, seed=1), (1, 28, 28)),
    "gn_cnn": (small_gn_cnn, (1, 28, 28)),
    # bags of 5 patch-feature vectors: Linear layers on (B, N, D) inputs
    "attention_mil": (
        lambda: create_model(
            "attention_mil", num_classes=10, in_features=6, embed_dim=12, attention_dim=4, seed=1
        ),
        (5, 6),
    ),
    # GroupNorm in place of BatchNorm, residual blocks that add the shortcut in place
    "timm_resnet": (
        lambda: create_model("timm:test_resnet", num_classes=10, in_channels=1, seed=1),
        (1, 28, 28),
    ),
}


@pytest.mark.parametrize(
    "model_name",
    ["mlp", "gn_cnn", "attention_mil", pytest.param("timm_resnet", marks=pytest.mark.slow)],
)
def test_mechanisms_give_the_reference_clipped_gradient(model_name):
    """σ = 0: every mechanism's gradient is (Σ_i min(1, C/‖g_i‖) g_i) / B, computed here by
    brute force, so the released quantity and its sensitivity C are the same. In float64,
    so that summation order cannot hide a real difference."""
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    x, y = torch.randn(8, *shape, dtype=torch.float64), torch.randint(0, 10, (8,))
    teacher = torch.randn(8, 10, dtype=torch.float64)
    expected_batch = 10
    per_sample = unit_grads(
        build().double(),
        lambda model, rows: dml_loss(model(x[rows]), y[rows], teacher[rows]),
        torch.arange(8),
    )
    clip = per_sample.norm(dim=1).median().item()  # half the records are clipped, half not
    reference = clipped_sum(per_sample, clip) / expected_batch

    grads = {}
    for mechanism in MECHANISMS:
        model = build().double()
        training = private_training(
            model, images(20, 0, shape), mechanism=mechanism, clip=clip, batch_size=expected_batch
        )
        training.backward(dml_loss(model(x), y, teacher))
        training.step()
        grads[mechanism] = flat_grad(model)
        assert torch.allclose(grads[mechanism], reference, rtol=1e-9, atol=1e-12), mechanism
    for mechanism in MECHANISMS:
        assert torch.allclose(grads[mechanism], grads["hooks"], rtol=1e-9, atol=1e-12)


def test_noise_is_added_with_std_sigma_c_over_b():
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    grads = {}
    for sigma in (0.0, 1.5):
        model = create_model("mlp", num_classes=10, seed=1)
        training = private_training(
            model, images(64, 0), sigma=sigma, clip=0.5, batch_size=16, secret_seed=3
        )
        training.backward(F.cross_entropy(model(x), y, reduction="none"))
        training.step()
        grads[sigma] = flat_grad(model)
    noise = grads[1.5] - grads[0.0]
    assert not torch.allclose(grads[1.5], grads[0.0])
    expected_std = 1.5 * 0.5 / 16
    assert training.noise_std == pytest.approx(expected_std)
    # ~200k coordinates: the sample std is within 1% of the truth with overwhelming odds
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(noise.mean().item()) < 0.01 * expected_std


def _run_rounds(training: PrivateTraining, model: nn.Module, rounds: int) -> list[float]:
    epsilons = []
    for _ in range(rounds):
        for x, y in poisson_batches(training):
            training.backward(F.cross_entropy(model(x), y, reduction="none"))
            training.step()
        epsilons.append(training.epsilon())
    return epsilons


def test_epsilon_grows_per_round_and_equals_opacus_accountant():
    model = _small_mlp()
    training = private_training(model, images(40, 0), sigma=1.0, batch_size=10, delta=1e-4)
    epsilons = _run_rounds(training, model, rounds=3)
    assert epsilons[0] > 0 and epsilons[0] < epsilons[1] < epsilons[2]
    assert training.steps_taken == 3 * 4  # opacus' Poisson sampler: 1/q batches per pass
    reference = RDPAccountant()
    for _ in range(training.steps_taken):
        reference.step(noise_multiplier=1.0, sample_rate=10 / 40)
    # What the steps fed the accountant is opacus' history exactly; the ε reported is that
    # history's under the replace-one relation.
    assert training.history == reference.history
    assert training.epsilon() == epsilon_from_history(reference.history, 1e-4,
                                                      relation="substitution")
    assert epsilon_from_history(training.history, 1e-4, relation="add_remove") == (
        pytest.approx(reference.get_epsilon(delta=1e-4), rel=1e-12))


def test_epsilon_from_history_equals_opacus_for_changing_settings():
    history = [(1.0, 0.25, 12), (1.4, 0.1, 30), (1.0, 0.25, 5)]
    reference = RDPAccountant()
    reference.history = list(history)
    assert epsilon_from_history(history, 1e-5, relation="add_remove") == (
        reference.get_epsilon(delta=1e-5))
    assert epsilon_from_history([], 1e-5) == 0.0


def _epsilon_of_rdp(rdp: np.ndarray, delta: float) -> float:
    return float(rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])


def test_substitution_epsilon_is_the_weak_triangle_bound_over_opacus_rdp():
    """Replace-one = remove one unit, then add another. Mironov (CSF 2017, Prop. 11, p = q = 2):
    D_α(P‖R) ≤ (α − ½)/(α − 1)·D_2α(P‖Q) + D_(2α−1)(Q‖R), each term opacus' add/remove RDP."""
    history = [(1.0, 0.25, 12), (1.4, 0.1, 30)]
    orders = np.asarray(RDP_ORDERS)

    def add_remove(at: np.ndarray, sigma: float, q: float) -> np.ndarray:
        return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                   orders=list(at)))

    rdp = sum(steps * ((orders - 0.5) / (orders - 1) * add_remove(2 * orders, sigma, q)
                       + add_remove(2 * orders - 1, sigma, q))
              for sigma, q, steps in history)
    expected = _epsilon_of_rdp(rdp, 1e-5)
    assert epsilon_from_history(history, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert expected > epsilon_from_history(history, 1e-5, relation="add_remove")


@pytest.mark.parametrize("order", [2.0, 8.0, 32.0])
def test_substitution_rdp_is_above_an_achievable_pair(order):
    # Replacing a unit whose clipped gradient is +C by one whose gradient is −C is a real
    # replace-one pair: one step releases (1−q)N(0,σ²) + qN(∓1,σ²) (in units of C). The bound
    # must not be below their Rényi divergence, computed here by quadrature.
    sigma, q = 1.0, 0.2
    x = np.linspace(-30, 30, 600_001)

    def log_mixture(mean: float) -> np.ndarray:
        return np.logaddexp(np.log1p(-q) - x**2 / (2 * sigma**2),
                            np.log(q) - (x - mean) ** 2 / (2 * sigma**2)) - 0.5 * np.log(
            2 * np.pi * sigma**2)

    log_p, log_q = log_mixture(-1.0), log_mixture(1.0)
    integrand = np.exp(order * log_p + (1 - order) * log_q)
    achieved = np.log(np.trapezoid(integrand, x)) / (order - 1)
    index = RDP_ORDERS.index(order)
    bound = _rdp_of_one_step(sigma, q, "substitution")[index]
    assert achieved > _rdp_of_one_step(sigma, q, "add_remove")[index]  # add/remove is too low
    assert bound >= achieved


def test_substitution_epsilon_of_a_release_over_all_units_doubles_the_sensitivity():
    # q = 1 is the Gaussian mechanism; replacing a unit moves the sum by up to 2C, the same
    # as adding one at half the noise multiplier (RDP 2α/σ²), which opacus computes exactly.
    sigma = 1.3
    assert epsilon_from_history([(sigma, 1.0, 3)], 1e-5) == pytest.approx(
        epsilon_from_history([(sigma / 2, 1.0, 3)], 1e-5, relation="add_remove"), rel=1e-12)


def test_default_delta_and_the_largest_sampling_rate():
    assert default_delta(40) == 1e-5 and default_delta(20_000) == 1 / 200_000
    assert dp_batch_size(8, 20, 0.25) == 5  # q = 0.25, not 0.4
    assert dp_batch_size(8, 100, 0.25) == 8
    assert dp_batch_size(8, 3, 0.25) == 1  # at least one unit; the caller warns


def test_mechanisms_account_identically():
    epsilons = {}
    for mechanism in MECHANISMS:
        model = _small_mlp()
        training = private_training(
            model, images(40, 0), mechanism=mechanism, sigma=0.8, batch_size=10
        )
        epsilons[mechanism] = _run_rounds(training, model, rounds=2)
    assert all(values == epsilons["hooks"] for values in epsilons.values())


def test_epsilon_after_a_round_is_known_before_it_and_bounds_the_budget():
    model = _small_mlp()
    probe = private_training(_small_mlp(), images(40, 0), sigma=1.0, batch_size=10)
    first, second = _run_rounds(probe, probe.model, rounds=2)
    training = private_training(
        model, images(40, 0), sigma=1.0, batch_size=10, budget=(first + second) / 2
    )
    steps = len(training.batch_sampler)  # one round: 1/q Poisson batches
    assert training.epsilon_after(steps) == first
    assert training.fits_budget(steps)
    _run_rounds(training, model, rounds=1)
    assert training.epsilon_after(steps) == pytest.approx(second, rel=1e-12)  # not spent:
    assert training.epsilon() == first and training.steps_taken == steps
    assert not training.fits_budget(steps)  # the second round would pass the budget
    assert probe.fits_budget(10**6)  # no budget: always fits


def test_sampling_and_noise_are_secret_unless_a_test_fixes_them():
    def final_parameters(secret_seed: int | None) -> tuple[torch.Tensor, list[int]]:
        model = _small_mlp()
        training = private_training(
            model, images(60, 0), sigma=1.0, batch_size=15, secret_seed=secret_seed, lr=0.1
        )
        sizes = []
        for x, y in poisson_batches(training):
            sizes.append(len(x))
            training.backward(F.cross_entropy(model(x), y, reduction="none"))
            training.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), sizes

    # Same model, data and settings (what every peer knows): fresh keys draw other batches
    # and other noise, so nothing shared regenerates them.
    secret_a, secret_b = final_parameters(None), final_parameters(None)
    assert not torch.allclose(secret_a[0], secret_b[0])
    # A test-fixed key repeats them exactly; another fixed key does not.
    params_a, sizes_a = final_parameters(7)
    params_b, sizes_b = final_parameters(7)
    params_c, _ = final_parameters(8)
    assert torch.equal(params_a, params_b) and sizes_a == sizes_b
    assert not torch.allclose(params_a, params_c)


def test_poisson_batches_vary_around_the_expected_size():
    model = _small_mlp()
    training = private_training(model, images(200, 0), batch_size=20)
    sizes = [len(x) for _ in range(10) for x, _ in poisson_batches(training)]
    assert training.sample_rate == pytest.approx(0.1)
    assert len(set(sizes)) > 3
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.15)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_empty_batch_is_a_noise_only_step(mechanism):
    model = _small_mlp()
    training = private_training(model, images(20, 0), mechanism=mechanism, sigma=1.0, batch_size=5)
    x, y = torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long)
    training.backward(F.cross_entropy(model(x), y, reduction="none"))
    training.step()
    grad = flat_grad(model)
    assert torch.isfinite(grad).all()
    assert grad.std().item() == pytest.approx(training.noise_std, rel=0.02)
    assert training.steps_taken == 1


def test_state_dict_resumes_accounting_and_noise():
    def fresh() -> tuple[nn.Module, PrivateTraining]:
        model = _small_mlp()
        return model, private_training(model, images(40, 0), sigma=1.0, batch_size=10,
                                       secret_seed=5)

    model, training = fresh()
    _run_rounds(training, model, rounds=1)
    saved = training.state_dict()
    epsilon_after_one = training.epsilon()
    _run_rounds(training, model, rounds=1)
    continued = flat_grad(model)

    resumed_model, resumed = fresh()
    resumed.load_state_dict(saved)
    assert resumed.epsilon() == epsilon_after_one
    _run_rounds(resumed, resumed_model, rounds=1)
    # parameters were not restored (lr = 0 keeps them equal), so the last noisy gradient
    # matches only if sampling and noise continue where they stopped
    assert torch.equal(flat_grad(resumed_model), continued)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_model_stays_unwrapped_and_close_removes_hooks(mechanism):
    model = _small_mlp()
    keys = list(model.state_dict())
    training = private_training(model, images(20, 0), mechanism=mechanism, batch_size=5)
    assert training.model is model and list(model.state_dict()) == keys
    assert any(m._forward_hooks for m in model.modules())
    training.close()
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


class _InPlaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        h += x  # modifies the linear layer's output in place
        return self.head(h)


def test_bookkeeping_refuses_in_place_outputs_and_double_forwards():
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    model = _InPlaceResidual()
    training = private_training(model, TensorDataset(x, y), batch_size=3)
    with pytest.raises(RuntimeError, match="Linear was modified in place"):
        training.backward(F.cross_entropy(model(x), y, reduction="none"))

    model = _small_mlp()
    training = private_training(model, images(20, 0), batch_size=5)
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    model(x)  # e.g. a teacher forward that should have run under torch.no_grad()
    with pytest.raises(RuntimeError, match="ran twice before backward"):
        training.backward(F.cross_entropy(model(x), y, reduction="none"))


def test_bookkeeping_gives_layers_the_forward_skipped_a_zero_gradient():
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)})
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    training = private_training(model, TensorDataset(x, y), batch_size=3)
    training.backward(F.cross_entropy(model["used"](x), y, reduction="none"))
    training.step()
    assert torch.count_nonzero(model["unused"].weight.grad) == 0
    assert torch.count_nonzero(model["used"].weight.grad) > 0


def test_delta_defaults_well_below_one_over_n_and_a_large_one_is_warned(caplog):
    training = private_training(_small_mlp(), images(50, 0), batch_size=5, delta=None)
    assert training.delta == 1e-5
    assert "above 1/(10 n)" not in caplog.text
    training = private_training(_small_mlp(), images(50, 0), batch_size=5, delta=1e-3)
    assert training.delta == 1e-3
    assert "delta 0.001 is above 1/(10 n) = 0.002" not in caplog.text  # 1e-3 < 1/500
    private_training(_small_mlp(), images(50, 0), batch_size=5, delta=1e-2)
    assert "delta 0.01 is above 1/(10 n) = 0.002 for its n = 50 units" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1.0},
        {"max_grad_norm": 0.0},
        {"delta": 1.0},
        {"epsilon_budget": 0.0},
        {"mechanism": "magic"},
    ],
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="DPConfig"):
        DPConfig(**kwargs)


def test_backward_rejects_a_reduced_loss_and_oversized_batches():
    model = _small_mlp()
    training = private_training(model, images(20, 0), batch_size=5)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="per-sample loss vector"):
        training.backward(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="batch_size 30"):
        private_training(_small_mlp(), images(20, 0), batch_size=30)


def _bench(run, **args):
    """``run(args)`` of benchmarks.dp, restoring torch's thread count afterwards."""
    threads = torch.get_num_threads()
    try:
        return run(argparse.Namespace(**args))
    finally:
        torch.set_num_threads(threads)


def test_bench_reports_every_mechanism():
    from benchmarks.dp import run

    report = _bench(
        run,
        model="mlp",
        classes=10,
        in_channels=1,
        image_size=28,
        records=40,
        batch_size=10,
        threads=1,
        device="cpu",
        steps=1,
        warmup=1,
        repeats=1,
        rounds=2,
        epsilon_calls=1,
        seed=0,
    )
    assert set(report["cpu_ms_per_step"]["median"]) == {"no_dp", *MECHANISMS}
    assert report["epsilon_steps_in_history"] == 8
    assert report["epsilon_ms_per_call"]["epsilon_from_history"] > 0


def test_bench_reports_slide_level_clipping():
    from benchmarks.dp import run_slides

    report = _bench(
        run_slides,
        model="cnn1",
        classes=2,
        in_channels=3,
        image_size=16,
        slides=2,
        patches_per_slide=3,
        threads=1,
        device="cpu",
        steps=1,
        warmup=1,
        repeats=1,
        seed=0,
    )
    assert set(report["cpu_ms_per_step"]["ratio_to_no_dp_median"]) == {
        *(f"{name}_per_patch" for name in MECHANISMS),
        *(f"{name}_per_slide" for name, mechanism in MECHANISMS.items() if mechanism.clips_groups),
    }
    assert report["setting"]["patches"] == 6
