"""The roof of slidefed: the console script, ``predict``, and the workflow's helpers.

- ``slidefed.cli``: the ``slidefed`` console script (``python -m slidefed``). It is the one
  place that composes ``wsi``, ``preprocessing`` and ``federation``, so it sits above all
  three in the import graph and none of them imports it (``tests/test_layout.py``).
- ``slidefed.predict``: ``slidefed predict``, slides to calls with a saved model.
- ``slidefed.workflow``: the Snakemake workflow's config checks and the command-line options
  its rules pass.

What every floor shares (atomic writes, PNG, the one-line error rule) lives in ``formats``,
below them all. Importing this package imports none of these modules.
"""
