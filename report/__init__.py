"""``slidefed results-report OUT_DIR``: one self-contained HTML page of a workflow's results.

``collect`` reads the workflow's output directory (manifests, QC pictures, each algorithm's
run), ``figures`` draws the plots with matplotlib, ``embed`` turns pictures into data URIs,
``versions`` lists the software, and ``render`` fills ``templates/report.html.j2`` and writes
the page atomically. Torch-free: the report reads files, it never loads a model.
"""
