"""FlatParameters: one contiguous buffer per model, packed and unpacked in place."""

import logging

import pytest
import torch
from torch import nn

from federation.models.scattering import ScatteringLinear
from federation.transport.flat import FlatParameters


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_pack_lays_out_parameters_in_named_parameters_order() -> None:
    model = _mlp(0)
    flat = FlatParameters(model)
    expected = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    assert flat.numel == 6 * 5 + 5 + 5 * 3 + 3
    assert torch.equal(flat.pack(), expected)


def test_binding_keeps_the_models_values_and_function() -> None:
    model, twin = _mlp(0), _mlp(0)
    FlatParameters(model)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), twin(x))


def test_pack_is_the_live_parameters_without_copying() -> None:
    model = _mlp(0)
    flat = FlatParameters(model)
    first = flat.pack()
    before = first.clone()
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert flat.pack().data_ptr() == first.data_ptr()
    changed = (first != before).nonzero().reshape(-1).tolist()
    assert changed == list(range(30, 35))  # the first layer's bias follows its 6x5 weight


def test_unpack_copies_into_the_same_parameter_objects() -> None:
    source, target = _mlp(1), _mlp(2)
    params_before = [id(p) for p in target.parameters()]
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    FlatParameters(target).unpack(FlatParameters(source).pack())
    assert [id(p) for p in target.parameters()] == params_before
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(target(x), source(x))
    # The optimizer still holds the live parameters: a step moves the unpacked weights.
    target(x).sum().backward()
    optimizer.step()
    assert not torch.equal(target[0].weight, source[0].weight)


def test_unpack_does_not_alias_the_buffer() -> None:
    model = _mlp(0)
    flat = FlatParameters(model)
    buffer = torch.zeros(flat.numel)
    flat.unpack(buffer)
    buffer += 5.0
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


def test_unpack_rejects_a_buffer_of_the_wrong_size() -> None:
    flat = FlatParameters(_mlp(0), name="proxy")
    with pytest.raises(ValueError, match=r"proxy: received buffer has 10 elements.* 53 param"):
        flat.unpack(torch.zeros(10))


def test_mixed_dtypes_and_mixed_devices_are_refused() -> None:
    model = _mlp(0)
    model[2].double()
    with pytest.raises(TypeError, match="mix dtypes"):
        FlatParameters(model)
    mixed = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]"):
        FlatParameters(mixed)


def test_host_is_the_buffer_itself_on_the_cpu_and_unpacking_it_keeps_the_values() -> None:
    model = _mlp(0)
    flat = FlatParameters(model)
    assert flat.host().data_ptr() == flat.pack().data_ptr()
    before = flat.pack().clone()
    flat.unpack(flat.host())
    assert torch.equal(flat.pack(), before)


@pytest.mark.parametrize(
    ("rebind", "message"),
    [
        (lambda m: m.double(), "parameter '0.weight' no longer lives in the flat buffer"),
        (lambda m: m.__setitem__(2, nn.Linear(5, 3)), "parameter '2.weight' no longer lives"),
        (lambda m: m.load_state_dict(_mlp(1).state_dict(), assign=True), "'0.weight'"),
        (lambda m: m.append(nn.Linear(3, 1)), "now has 6 parameter tensors, .* binds 4"),
    ],
    ids=["to-dtype", "replaced-layer", "assign", "added-layer"],
)
def test_parameters_rebound_after_binding_are_detected(rebind, message: str) -> None:
    model = _mlp(0)
    flat = FlatParameters(model, name="proxy")
    rebind(model)
    with pytest.raises(RuntimeError, match=message):
        flat.pack()
    with pytest.raises(RuntimeError, match=message):
        flat.unpack(torch.zeros(flat.numel))


def test_buffers_stay_local_and_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    model(torch.randn(8, 4))  # moves the running statistics away from their initial values
    running_mean = model[1].running_mean.clone()
    with caplog.at_level(logging.WARNING, logger="federation.transport.flat"):
        flat = FlatParameters(model, name="bn")
    # running mean and variance (3 + 3); the integer batch counter is not a float buffer
    assert "bn: 6 floating-point buffer elements" in caplog.text
    assert flat.numel == 4 * 3 + 3 + 3 + 3
    flat.unpack(torch.zeros(flat.numel))
    assert torch.equal(model[1].running_mean, running_mean)


# Opacus warns about its non-secure RNG and full backward hooks; neither is under test here.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_binding_survives_opacus_dp_training() -> None:
    """Opacus wraps the module and steps the same Parameter objects, so the buffer follows."""
    from opacus import PrivacyEngine  # imported here: it is slow, and only this test needs it

    model = _mlp(0)
    flat = FlatParameters(model, name="proxy")
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    )
    private_model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=generator,
    )
    before = flat.pack().clone()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(private_model(x), y).backward()
        optimizer.step()
    assert torch.count_nonzero(flat.pack() != before) == flat.numel
    flat.unpack(before)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in private_model.parameters()]),
                       before)


def test_checkpoints_of_a_bound_model_stay_compact(tmp_path) -> None:
    """torch.save writes the shared storage once, not once per parameter view."""
    model = _mlp(0)
    before, after = tmp_path / "before.pt", tmp_path / "after.pt"
    torch.save(model.state_dict(), before)
    FlatParameters(model)
    torch.save(model.state_dict(), after)
    assert after.stat().st_size < 1.05 * before.stat().st_size
    restored = _mlp(1)
    restored.load_state_dict(torch.load(after))
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), model.parameters(),
                                                   strict=True))


def test_constants_and_buffers_set_alike_are_not_reported(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    with caplog.at_level(logging.WARNING, logger="federation.transport.flat"):
        flat = FlatParameters(ScatteringLinear(num_classes=2), name="scattering")
    assert flat.numel == 86 and "buffer" not in caplog.text
