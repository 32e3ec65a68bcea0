"""Federated algorithms, one module each, found by name in ``ALGORITHMS``.

Every algorithm subclasses ``Algorithm`` (``base.py``); adding one means adding one module and
one line to ``federation.catalog``, whose ``ALGORITHMS`` imports a module when its algorithm
is first looked up. ``register_algorithm`` adds one at run time (plug-ins, tests).

=========  ==============================================================  ==============
name       what a client holds / what crosses clients                      reported model
=========  ==============================================================  ==============
regular    private model; nothing                                          private
regular_dp DP private model (released after training); nothing            private
joint      one model, identical everywhere; gradient sums (no DP)          shared
fedavg     DP shared model; weighted average of sampled clients' models   shared
avgpush    DP shared model; push-averaged over the exponential graph       shared
cwt        DP shared model; passed on around the ring                      shared
fml        private (local) + DP shared (meme) model, mutual learning;      private
           FedAvg of the memes
proxyfl    private + DP proxy, mutual learning; proxies push-averaged      private
=========  ==============================================================  ==============
"""

from federation.algorithms.base import ALGORITHMS, Algorithm, Losses, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "Losses", "register_algorithm"]
