"""Whole-slide image access: slides, resolution, tissue, patch grids, patch bags, synthetic slides.

Nothing in this package imports torch or mpi4py, so a hospital's preprocessing job needs
neither.
"""
