"""Per-sample and per-unit clipping: how DP-SGD's clipped gradient sum is computed.

How the per-sample clipping is computed is a named *mechanism* (``DPConfig.mechanism``):

- ``"bookkeeping"`` (default): ``BookkeepingClipping`` — one backward pass split in two
  halves around the per-record gradient norms (Bu et al., ICML 2023, arXiv 2210.00038),
  built on opacus' per-layer norm and per-sample-gradient rules.
- ``"ghost"``: opacus' fast gradient / ghost clipping (Li et al., "Large language models
  can be strong differentially private learners", ICLR 2022, arXiv 2110.05679): a first
  backward pass yields the per-record gradient norms (ghost norms for linear layers, never
  materialising a per-sample gradient), a second backward pass of Σ_i c_i·loss_i the
  clipped sum.
- ``"hooks"``: opacus' classic per-sample-gradient hooks, which materialise all B
  per-sample gradients and clip them (for the MLP's first layer alone, 250 × 157k floats).
  The reference.

All three produce the same clipped sum Σ_i min(1, C/(‖g_i‖ + 1e-6))·g_i (tests check it in
float64 against a brute-force per-record loop), hand it to the same opacus ``DPOptimizer``
noise step, and feed the accountant the same (σ, q) per step, so they give the same
(ε, δ) guarantee. They differ only in cost: measured with ``python -m
benchmarks.dp`` (MLP, batch 250, one thread), bookkeeping takes ~1.5× the time of a
non-private step, ghost ~2×, hooks ~40× (CPU time, median of three runs).

Per-slide clipping (``backward(loss, groups)``). A slide gives many patches, and DP-SGD
with a patch as its record protects a patch, not a patient. Slide-level DP treats a slide
as the record: each step Poisson-samples slides (rate q = expected slides / slides), takes
at most k patches from each, clips each slide's *summed* gradient G_s = Σ_{i∈s} ∇loss_i to
C and adds N(0, σ²C²) — the sampled Gaussian mechanism of DP-SGD with a slide in place of
a record, as user-level DP clips each user's whole update (McMahan, Ramage, Talwar &
Zhang, "Learning differentially private recurrent language models", ICLR 2018, arXiv
1710.06963). Removing a slide changes the clipped sum by at most C, so the guarantee and
the accountant are those above with q the slide sampling rate; only the clipping changes,
to Σ_s min(1, C/(‖G_s‖ + 1e-6))·G_s (tests check it in float64 against a brute-force
per-slide loop). ``bookkeeping`` takes each slide's gradient norm layer by layer and scales
each patch by its slide's factor; ``hooks`` sums opacus' per-patch gradients per slide
before opacus clips them; ``ghost`` clips rows only and refuses slides of several patches.
On a patch CNN (cnn1, 8 slides × 16 patches of 3×64×64, one thread, ``bench_dp --slides``)
per-slide bookkeeping took 1.7-2.0× the CPU time of a non-private step, hooks 3.6-4.2×
(medians of five repeats, three runs on a loaded, shared machine). Sampling slides and
bounding k is the loader's job, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn


@dataclass
class _LayerRecord:
    module: nn.Module
    activations: list[torch.Tensor]
    output: torch.Tensor
    version: int


_GRAD_SAMPLERS = GradSampleHooks.GRAD_SAMPLERS
_NORM_SAMPLERS = GradSampleHooksFastGradientClipping.NORM_SAMPLERS


def _trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


class Groups:
    """Each batch row's privacy unit (e.g. its slide), validated: ``index`` (N,) int64 with
    values 0..count-1, every value used at least once."""

    def __init__(self, index: torch.Tensor, rows: int, device: torch.device) -> None:
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
            raise ValueError("groups: expected a 1-D int64 tensor, one privacy unit per row")
        index = index.to(device)
        if len(index) != rows:
            raise ValueError(f"groups: {len(index)} entries for {rows} loss rows")
        if rows and int(index.min()) < 0:
            raise ValueError(f"groups: negative unit {int(index.min())}; units are 0..S-1")
        counts = torch.bincount(index)
        if not bool(counts.all()):
            missing = int((counts == 0).nonzero()[0])
            raise ValueError(f"groups: unit {missing} has no row; units must be 0..S-1, no gaps")
        self.index = index
        self.count = len(counts)
        self.largest = int(counts.max()) if rows else 0
        # the rows sorted by unit, for split() (a loader that keeps a slide's patches together
        # needs no reordering), and each row's slot within its unit, for the padded
        # (unit, slot, ...) layout of pad()
        self._sorted = bool((index[1:] >= index[:-1]).all())
        self._order = torch.argsort(index, stable=True)
        self._sizes = counts.tolist()
        starts = counts.cumsum(0) - counts
        self._slot = torch.empty_like(index)
        self._slot[self._order] = (
            torch.arange(rows, device=index.device) - starts[index[self._order]]
        )

    @property
    def trivial(self) -> bool:
        """One row per unit: per-unit clipping is per-record clipping."""
        return self.count == len(self.index)

    def sum(self, per_row: torch.Tensor) -> torch.Tensor:
        """(N, ...) → (S, ...): the sum of each unit's rows."""
        summed = per_row.new_zeros(self.count, *per_row.shape[1:])
        return summed.index_add_(0, self.index, per_row)

    def split(self, per_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, ...) → S tensors, unit s's rows."""
        rows = per_row if self._sorted else per_row.index_select(0, self._order)
        return rows.split(self._sizes)

    def pad(self, per_row: torch.Tensor) -> torch.Tensor:
        """(N, ...) → (S, largest, ...): each unit's rows side by side, zero-padded."""
        padded = per_row.new_zeros(self.count, self.largest, *per_row.shape[1:])
        padded[self.index, self._slot] = per_row
        return padded


_CONV_WEIGHT_GRADS = {
    nn.Conv1d: torch.nn.grad.conv1d_weight,
    nn.Conv2d: torch.nn.grad.conv2d_weight,
    nn.Conv3d: torch.nn.grad.conv3d_weight,
}


def _conv_group_grads(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    activations: torch.Tensor,
    backprops: torch.Tensor,
    groups: Groups,
) -> dict[nn.Parameter, torch.Tensor]:
    """Each group's summed gradient of a convolution: the ordinary weight gradient of the
    group's rows taken as a batch — torch's convolution backward, one call per group."""
    grads = {}
    if layer.weight.requires_grad:
        weight_grad = _CONV_WEIGHT_GRADS[type(layer)]
        # pad as the layer's own forward does (any padding mode, "same"), then convolve
        # without padding
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(activations, layer._reversed_padding_repeated_twice, mode=mode)
        padded = padded.to(backprops.dtype)
        grads[layer.weight] = torch.stack(
            [
                weight_grad(a, layer.weight.shape, b, layer.stride, 0, layer.dilation, layer.groups)
                for a, b in zip(groups.split(padded), groups.split(backprops), strict=True)
            ]
        )
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = groups.sum(backprops.flatten(2).sum(2))
    return grads


def _norms_to_squared(norms: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    return sum(norm.reshape(-1) ** 2 for norm in norms.values())


def _grads_to_squared(grads: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    return sum(g.reshape(len(g), -1).norm(dim=1) ** 2 for g in grads.values())


def _squared_norms(
    record: _LayerRecord, output_grad: torch.Tensor, groups: Groups | None
) -> torch.Tensor:
    """Squared norm of the gradient of one layer's parameters, per record (``groups`` None)
    or per group of rows: ‖Σ_{i∈s} ∂loss_i/∂θ_layer‖² for each group s."""
    layer, layer_type = record.module, type(record.module)
    if groups is None:
        if layer_type in _NORM_SAMPLERS:
            return _norms_to_squared(
                _NORM_SAMPLERS[layer_type](layer, record.activations, output_grad)
            )
        sampler = _GRAD_SAMPLERS.get(layer_type, ft_compute_per_sample_gradient)
        return _grads_to_squared(sampler(layer, record.activations, output_grad))
    if not groups.count:  # an empty batch: no group, no norm
        return output_grad.new_zeros(0)
    if layer_type is nn.Linear:
        # A linear layer's gradient is Σ over input positions of g·aᵀ, so a group's summed
        # gradient is that of one record whose positions are all its rows' positions: lay
        # the rows of a group side by side as one sequence and apply opacus' sequence rules
        # (padding rows are zero in a and g and add nothing). The ghost norm Σ (gᵢ·gⱼ)(aᵢ·aⱼ)
        # over pairs of positions costs ~T² per group, the per-group gradient d_in·d_out:
        # take the cheaper, the hybrid rule of book-keeping (2T² < p·d, arXiv 2210.00038).
        activations = groups.pad(record.activations[0]).flatten(1, -2)
        backprops = groups.pad(output_grad).flatten(1, -2)
        positions = activations.shape[1]
        if 2 * positions**2 < layer.in_features * layer.out_features:
            return _norms_to_squared(_NORM_SAMPLERS[nn.Linear](layer, [activations], backprops))
        return _grads_to_squared(_GRAD_SAMPLERS[nn.Linear](layer, [activations], backprops))
    if layer_type in _CONV_WEIGHT_GRADS:
        # opacus' per-row rule unfolds every input position (kernel-size copies of the input)
        # and was 7x the cost of the weight gradient on cnn1's first layer; a group's sum
        # needs only the weight gradient of its rows.
        return _grads_to_squared(
            _conv_group_grads(layer, record.activations[0], output_grad, groups)
        )
    # Other layers (GroupNorm, functorch): this one layer's per-row gradients, summed within
    # each group.
    sampler = _GRAD_SAMPLERS.get(layer_type, ft_compute_per_sample_gradient)
    grads = sampler(layer, record.activations, output_grad)
    return _grads_to_squared({p: groups.sum(g) for p, g in grads.items()})


class BookkeepingClipping:
    """Per-sample clipping in one backward pass ("book-keeping"), from opacus' layer rules.

    After Bu, Wang, Zha & Karypis, "Differentially private optimization on large model at
    small cost", ICML 2023, arXiv 2210.00038. Forward hooks keep each trainable layer's
    input a and output. ``backward`` then

    1. asks autograd for the gradients G of Σ_i loss_i with respect to the layer *outputs*
       only — the input-gradient half of a backward pass, no weight gradients;
    2. computes each record's gradient norm layer by layer from (a, G) with opacus' rules:
       the ghost norm for linear layers, materialised per-sample gradients of that one
       layer otherwise (convolutions, GroupNorm; functorch for layers without a rule);
    3. forms the clipping factors c_i = min(1, C / (‖g_i‖ + 1e-6)) — opacus' formula;
    4. gets each layer's clipped sum Σ_i c_i ∂loss_i/∂θ as the layer-local vector-Jacobian
       product of its output with the rows of G scaled by c — the weight-gradient half.

    With groups of rows (a slide's patches), step 2 takes the norm of each group's summed
    gradient, layer by layer (see ``_squared_norms``), step 3 gives one factor c_s per
    group, and step 4 scales each row by its group's factor: Σ_i c_{s(i)} ∂loss_i/∂θ is the
    clipped sum of the group gradients, at the same cost.

    So one DP backward costs about one ordinary backward plus the norms, where ghost
    clipping runs two full backward passes. A layer output modified in place after the
    layer ran (``x += shortcut``) would corrupt step 1 and is refused (see
    ``federation.models.group_norm.make_inplace_safe``); so is a layer run twice in one forward.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self._records: list[_LayerRecord] = []
        self._layers = [module for module in model.modules() if _trainable_parameters(module)]
        for module in self._layers:
            if type(module) not in _NORM_SAMPLERS and type(module) not in _GRAD_SAMPLERS:
                prepare_layer(module, batch_first=True)  # functorch per-sample gradients
        self._handles = [module.register_forward_hook(self._record) for module in self._layers]

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"BookkeepingClipping: {type(module).__name__} returns "
                f"{type(output).__name__}, not a tensor; use mechanism 'ghost' or 'hooks'"
            )
        activations = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
        self._records.append(_LayerRecord(module, activations, output, output._version))

    def backward(self, per_sample_loss: torch.Tensor, groups: Groups | None = None) -> None:
        """Set each trainable parameter's ``.grad`` to Σ_i c_i ∂loss_i/∂θ, with c_i the
        clipping factor of row i (``groups`` None) or of row i's group."""
        records, self._records = self._records, []
        modules = [record.module for record in records]
        if len(set(map(id, modules))) != len(modules):
            raise RuntimeError(
                "BookkeepingClipping: a layer ran twice before backward; run forwards whose "
                "output is only a target under torch.no_grad()"
            )
        for record in records:
            if record.output._version != record.version:
                raise RuntimeError(
                    f"BookkeepingClipping: the output of {type(record.module).__name__} was "
                    "modified in place; see federation.models.group_norm.make_inplace_safe"
                )
        output_grads = torch.autograd.grad(
            per_sample_loss.sum(),
            [record.output for record in records],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        units = len(per_sample_loss) if groups is None else groups.count
        squared_norms = per_sample_loss.new_zeros(units)
        for record, grad in zip(records, output_grads, strict=True):
            squared_norms = squared_norms + _squared_norms(record, grad, groups)
        factors = (self.max_grad_norm / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0).detach()
        if groups is not None:
            # Σ_s c_s Σ_{i∈s} ∂loss_i/∂θ = Σ_i c_{s(i)} ∂loss_i/∂θ: each row takes its group's
            # factor and step 4 below is unchanged.
            factors = factors[groups.index]
        for record, grad in zip(records, output_grads, strict=True):
            parameters = _trainable_parameters(record.module)
            scaled = grad * factors.view(-1, *([1] * (grad.dim() - 1)))
            clipped = torch.autograd.grad(
                record.output, parameters, grad_outputs=scaled, retain_graph=True
            )
            for parameter, clipped_grad in zip(parameters, clipped, strict=True):
                parameter.grad = clipped_grad
        ran = set(map(id, modules))
        for module in self._layers:  # a layer the forward skipped has a zero gradient
            if id(module) not in ran:
                for parameter in _trainable_parameters(module):
                    parameter.grad = torch.zeros_like(parameter)

    def cleanup(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._records = []


ClippingHandle = Any  # what a mechanism attaches to the model; has ``cleanup()``


@dataclass(frozen=True)
class Mechanism:
    """How per-sample clipping is computed.

    attach(model, C) hooks the model and returns a handle; ``optimizer_mode`` is the opacus
    grad-sample mode whose ``DPOptimizer`` adds the noise ("ghost": noise on ``.grad``,
    which already holds the clipped sum; "hooks": clip ``.grad_sample`` first); backward
    (handle, optimizer, per-sample loss, groups) leaves the clipped sum for that optimizer,
    clipping per row or, given ``Groups``, per group of rows. ``clips_groups`` False: the
    mechanism clips rows only, and is never handed groups of more than one row.
    """

    attach: Callable[[nn.Module, float], ClippingHandle]
    optimizer_mode: str
    backward: Callable[[ClippingHandle, DPOptimizer, torch.Tensor, Groups | None], None]
    clips_groups: bool


def _attach_opacus(mode: str) -> Callable[[nn.Module, float], GradSampleHooks]:
    def attach(model: nn.Module, max_grad_norm: float) -> GradSampleHooks:
        ghost_options = {"max_grad_norm": max_grad_norm} if mode == "ghost" else {}
        hooks = prepare_module(
            model,
            grad_sample_mode=mode,
            wrap_model=False,
            batch_first=True,
            loss_reduction="mean",
            **ghost_options,
        )
        # Poisson sampling: one batch is one step; accumulating two would break the analysis.
        hooks.forbid_grad_accumulation()
        return hooks

    return attach


def _backward_ghost(
    hooks: GradSampleHooks, optimizer: DPOptimizer, loss: torch.Tensor, groups: Groups | None
) -> None:
    # opacus' ghost clipping clips each row; groups reach it only as one row per group,
    # which is the same thing.
    DPTensorFastGradientClipping(hooks, optimizer, loss, loss_reduction="mean").backward()


def _backward_hooks(
    hooks: GradSampleHooks, optimizer: DPOptimizer, loss: torch.Tensor, groups: Groups | None
) -> None:
    loss.mean().backward()
    if groups is not None:
        # The DPOptimizer clips whatever rows grad_sample holds: make each row a group's
        # summed gradient, so opacus itself clips per group.
        for parameter in optimizer.params:
            if isinstance(getattr(parameter, "grad_sample", None), torch.Tensor):
                parameter.grad_sample = groups.sum(parameter.grad_sample)


def _backward_bookkeeping(
    clipping: BookkeepingClipping,
    optimizer: DPOptimizer,
    loss: torch.Tensor,
    groups: Groups | None,
) -> None:
    clipping.backward(loss, groups)


MECHANISMS: dict[str, Mechanism] = {
    "bookkeeping": Mechanism(BookkeepingClipping, "ghost", _backward_bookkeeping, True),
    "ghost": Mechanism(_attach_opacus("ghost"), "ghost", _backward_ghost, False),
    "hooks": Mechanism(_attach_opacus("hooks"), "hooks", _backward_hooks, True),
}
