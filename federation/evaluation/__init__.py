"""Slide-level evaluation: patch scores -> slide scores -> metrics per hospital and pooled.

``scoring`` turns a bag's patches into tumour probabilities and a slide score,
``metrics`` computes slide-level metrics with bootstrap intervals and picks decision
thresholds, and ``run`` evaluates a finished federation run (``slidefed evaluate``).
"""
