"""The bottom floor of slidefed: what crosses package lines, with no torch or MPI in it.

- ``formats.atomic``: files written under a temporary name and renamed, so a file exists
  whole or not at all.
- ``formats.png``: the one PNG encoder for QC pictures and heatmaps.
- ``formats.errors``: the one rule that turns an exception into the one line a user reads.
- ``formats.hospital_dir``: a hospital's preprocessing output — its folders and its manifest.

``wsi``, ``preprocessing``, ``federation`` and ``slidefed`` import from here; this package
imports none of them (``tests/test_layout.py``).
"""
