# Slide-level evaluation of each algorithm's run.

if FEDERATION:

    rule evaluate:
        """Slide-level diagnosis per hospital and pooled, with bootstrap intervals, and each
        hospital's proxy on every hospital's test slides."""
        input:
            f"{RUNS}/{{algorithm}}/summary.json",
        output:
            metrics=report(
                f"{RUNS}/{{algorithm}}/slide_metrics.json",
                category="Slide-level diagnosis",
                subcategory="{algorithm}",
                caption="../report/slide_metrics.rst",
            ),
            predictions=report(
                f"{RUNS}/{{algorithm}}/slide_predictions.csv",
                category="Slide-level diagnosis",
                subcategory="{algorithm}",
                caption="../report/slide_predictions.rst",
            ),
            cross_site=report(
                f"{RUNS}/{{algorithm}}/cross_site.csv",
                category="Slide-level diagnosis",
                subcategory="{algorithm}",
                caption="../report/cross_site.rst",
            ),
        params:
            run=f"{RUNS}/{{algorithm}}",
        log:
            f"{OUT}/logs/evaluate_{{algorithm}}.log",
        benchmark:
            f"{OUT}/benchmarks/evaluate_{{algorithm}}.tsv"
        shell:
            "slidefed evaluate {params.run} > {log} 2>&1"
