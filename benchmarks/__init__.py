"""Every speed and accuracy benchmark of slidefed, behind one launcher (``slidefed bench NAME``,
``benchmarks.commands``); ``benchmarks/README.md`` lists what each measures against what.

Benchmarks sit above the engine and the preprocessing jobs: they may import both (a benchmark
that needs a cohort builds one with ``preprocessing``), and nothing below imports them.
"""
