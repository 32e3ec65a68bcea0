"""The privacy audit: empirical membership inference on a finished run's models
(``slidefed audit``), reported beside the accountant's ε.

``metrics`` turns attack scores into AUC, TPR at low FPR and an empirical lower bound on ε
(torch-free); ``records`` is the file that says which images an image run held out (and
which canaries it planted); ``lira`` is the likelihood-ratio attack and its shadow runs;
``run`` scores each hospital's records with its own models, at that hospital, and writes
``audit.csv``, ``audit.json`` and the ROC plot.
"""
