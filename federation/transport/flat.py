"""A model's parameters as one contiguous buffer, the unit the federation moves between clients.

Only ``named_parameters()`` travel. The engine's models use GroupNorm, so parameters are the
whole learnable state; buffers (e.g. BatchNorm running statistics, if a model had them) stay
local to each client, and a model whose saved floating-point buffers may differ between clients
is logged once as a warning.

The parameters are re-pointed to be views into the flat buffer, so ``pack()`` costs nothing and
``unpack()`` is one copy. The alternative, copying parameters into a separate buffer, keeps
model and buffer independent but costs one more 45 MB copy per send for ResNet-18: head to
head on the 2-core development VM (2 MPI ranks, ring exchange, model to model, medians) views
took 50-64 ms, copies 74-77 ms, and a pickled ``state_dict`` 350-630 ms (``bench_comm``).
The ``Parameter`` objects stay the same (only their storage moves), so optimizers and opacus
hooks stay attached. The prices: (1) anything that re-binds parameters afterwards
(``Module.to`` to another dtype or device, replacing layers, ``load_state_dict(assign=True)``)
detaches them from the buffer, which ``pack``/``unpack`` detect and refuse rather than move
stale values; (2) each parameter is a view of the one storage, so *plain pickle* of a
state_dict serialises the whole buffer once per tensor (``torch.save`` shares the storage and
stays compact, and parameters never travel pickled here); (3) parameters must live on the CPU,
where MPI reads them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class FlatParameters:
    """Bind ``module``'s parameters, in ``named_parameters()`` order, to one contiguous buffer.

    Build it once the model is final (layers replaced, dtype set): from then on the parameters
    live inside the buffer. ``pack()`` returns the buffer itself, which changes whenever the
    model trains: clone it to keep a snapshot. ``unpack(buffer)`` copies a received buffer into
    the parameters in place. Parameters must be CPU tensors of one dtype, as MPI sends host
    memory.
    """

    def __init__(self, module: nn.Module, name: str = "model") -> None:
        self.name = name
        self._module = module
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"{name}: module has no parameters to flatten")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1:
            raise TypeError(f"{name}: parameters mix dtypes {sorted(map(str, dtypes))}")
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"{name}: parameters lie on several devices "
                             f"{sorted(map(str, devices))}")
        self.numel = sum(p.numel() for p in self._params)
        self._buffer = torch.empty(self.numel, dtype=dtypes.pop(), device=devices.pop())
        offset = 0
        with torch.no_grad():
            for p in self._params:
                view = self._buffer[offset:offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                offset += p.numel()
        self._addresses = [p.data_ptr() for p in self._params]
        # Saved buffers that may differ between clients: not the constants a module rebuilds
        # (non-persistent buffers), nor those it names in ``buffers_set_alike`` (set to the
        # same value on every client, as a fixed-feature model's centre is).
        alike = set(getattr(module, "buffers_set_alike", ()))
        local_buffers = sum(t.numel() for key, t in module.state_dict(keep_vars=True).items()
                            if key not in self._names and key not in alike
                            and t.is_floating_point())
        if local_buffers:
            log.warning(
                "%s: %d floating-point buffer elements (e.g. BatchNorm statistics) stay local "
                "and are not exchanged", name, local_buffers,
            )

    def pack(self) -> torch.Tensor:
        """The flat buffer holding the parameters (no copy; it changes as the model trains)."""
        self._check_bound()
        return self._buffer

    def host(self) -> torch.Tensor:
        """The parameters in host memory, which is what MPI sends: the flat buffer itself for a
        model on the CPU (no copy), a copy for a model on an accelerator."""
        return self.pack().cpu()

    @torch.no_grad()
    def unpack(self, buffer: torch.Tensor) -> None:
        """Copy ``buffer`` into the parameters in place, keeping the same ``Parameter`` objects
        (nothing to copy when ``buffer`` is the flat buffer itself)."""
        self._check_bound()
        self.check(buffer)
        if buffer.data_ptr() != self._buffer.data_ptr():
            self._buffer.copy_(buffer.reshape(-1))

    def check(self, buffer: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``buffer`` has exactly this model's number of elements."""
        if buffer.numel() != self.numel:
            raise ValueError(
                f"{self.name}: received buffer has {buffer.numel()} elements, "
                f"the model has {self.numel} parameters"
            )

    def _check_bound(self) -> None:
        """Refuse to move stale values once the model's parameters left the buffer."""
        current = list(self._module.parameters())
        if len(current) != len(self._params):
            raise RuntimeError(
                f"{self.name}: the model now has {len(current)} parameter tensors, the flat "
                f"buffer binds {len(self._params)}; rebuild FlatParameters"
            )
        for name, p, q, address in zip(
            self._names, current, self._params, self._addresses, strict=True
        ):
            if p is not q or p.data_ptr() != address:
                raise RuntimeError(
                    f"{self.name}: parameter {name!r} no longer lives in the flat buffer (re-bound "
                    "by .to(), a replaced layer or load_state_dict(assign=True)?); rebuild "
                    "FlatParameters"
                )
