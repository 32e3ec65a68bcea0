# The results report: one self-contained HTML page of the cohort, training, privacy and
# slide-level results of every algorithm, with the configuration that produced them.

import json

import yaml


rule results_report:
    """results/<run>/report.html, from the manifests, QC pictures and evaluated runs."""
    input:
        MANIFESTS,
        expand(f"{RUNS}/{{algorithm}}/slide_metrics.json", algorithm=ALGORITHMS),
        expand(f"{RUNS}/{{algorithm}}/heatmaps.csv", algorithm=ALGORITHMS),
    output:
        report(
            f"{OUT}/report.html",
            category="Results report",
            caption="../report/results_report.rst",
        ),
    params:
        out=OUT,
        # The configuration as Snakemake resolved it (config files and --config), shown in
        # the report; a change to it reruns the report (Snakemake's params trigger).
        config=yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False),
        thumbnails=REPORT["thumbnails_per_hospital"],
        runs=" ".join(f"--run {a}" for a in ALGORITHMS),
    log:
        f"{OUT}/logs/results_report.log",
    benchmark:
        f"{OUT}/benchmarks/results_report.tsv"
    shell:
        "printf '%s' {params.config:q} | slidefed results-report {params.out} "
        "--workflow-config - --thumbnails {params.thumbnails} {params.runs} > {log} 2>&1"
