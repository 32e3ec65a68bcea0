"""The neutral package of slidefed: the console script and one shared file helper.

- ``slidefed.cli``: the ``slidefed`` console script (``python -m slidefed``). It is the one
  place that composes ``wsi``, ``preprocessing`` and ``federation``, so it sits above all
  three in the import graph and none of them imports another to be launched.
- ``slidefed.atomic``: atomic file writes, which ``wsi``, ``preprocessing`` and
  ``federation`` all use; it sits below them and imports only the standard library, so the
  engine need not import ``wsi`` for it.
- ``slidefed.workflow``: the Snakemake workflow's config checks and the command-line options
  its rules pass; like the console script it sits above the three packages.

Nothing else belongs here; importing this package imports none of these modules.
"""
