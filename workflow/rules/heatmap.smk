# Heatmaps of a few test slides per hospital, with each of its models, for the report: after
# evaluation, from the bags and QC pictures alone.

if FEDERATION:

    rule heatmap:
        """The first `report.heatmaps_per_hospital` test slides of each hospital, drawn with
        every model of the algorithm's run; heatmaps.csv lists them."""
        input:
            f"{RUNS}/{{algorithm}}/slide_metrics.json",
        output:
            f"{RUNS}/{{algorithm}}/heatmaps.csv",
        params:
            run=f"{RUNS}/{{algorithm}}",
            limit=REPORT["heatmaps_per_hospital"],
        log:
            f"{OUT}/logs/heatmap_{{algorithm}}.log",
        benchmark:
            f"{OUT}/benchmarks/heatmap_{{algorithm}}.tsv"
        shell:
            "slidefed heatmap {params.run} --limit {params.limit} > {log} 2>&1"
