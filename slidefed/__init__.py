"""The neutral package of slidefed: the console script and one shared file helper.

- ``slidefed.cli``: the ``slidefed`` console script (``python -m slidefed``). It is the one
  place that composes ``wsi``, ``preprocessing`` and ``federation``, so it sits above all
  three in the import graph and none of them imports another to be launched.
- ``slidefed.atomic``: atomic file writes, which ``wsi``, ``preprocessing`` and
  ``federation`` all use; it sits below them and imports only the standard library, so the
  engine need not import ``wsi`` for it.

Nothing else belongs here; importing this package imports neither module.
"""
