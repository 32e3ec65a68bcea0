"""The neutral top of slidefed: the ``slidefed`` console script (``slidefed.cli``).

It is the one place that composes ``wsi``, ``preprocessing`` and ``federation``; it sits
above all three in the import graph, so none of them has to import another to be launched
(``python -m slidefed federate`` under ``mpiexec``).
"""
