"""Differential privacy, in rooms that each do one thing (as opacus keeps grad samplers,
optimizers and accountants apart):

- ``training``: ``PrivateTraining``, the facade — Poisson sampling, clipping, noise and
  accounting of one model of one client; the only place noise is drawn and ε charged.
- ``clipping``: how the clipped sum of per-sample or per-unit gradients is computed (the
  ``MECHANISMS``: bookkeeping, ghost, hooks).
- ``accounting``: RDP of the sampled Gaussian mechanism, composed, converted to (ε, δ) under
  the replace-one relation.
- ``randomness``: the secret per-hospital streams every DP draw comes from.
- ``statement``: what a reported ε means, in words (torch-free, for reports).

Importing this package imports none of them, so the reports read ``statement`` without torch.
"""
