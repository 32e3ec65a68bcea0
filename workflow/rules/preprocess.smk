# Each hospital's slides are that hospital's job; a failed slide is a row of the manifest
# (status failed, with the reason), not a failed job.


rule preprocess:
    """One hospital's job: its slides to patch bags, a manifest and QC pictures."""
    input:
        slides=lambda wc: HOSPITALS[wc.hospital][0],
        annotations=lambda wc: HOSPITALS[wc.hospital][1] or [],
    output:
        manifest=report(
            f"{OUT}/preprocessed/{{hospital}}/manifest.csv",
            category="Cohort",
            subcategory="{hospital}",
            caption="../report/manifest.rst",
        ),
    params:
        out=f"{OUT}/preprocessed/{{hospital}}",
        annotations=lambda wc, input: (
            f" --annotations {input.annotations}" if input.annotations else ""
        ),
        tiling=preprocess_options(config.get("tiling", {})),
    threads: config["preprocess_workers"]
    log:
        f"{OUT}/logs/preprocess_{{hospital}}.log",
    benchmark:
        f"{OUT}/benchmarks/preprocess_{{hospital}}.tsv"
    shell:
        "slidefed preprocess --hospital {wildcards.hospital} --slides {input.slides} "
        "-o {params.out} --workers {threads} {params.tiling}{params.annotations} "
        "> {log} 2>&1"
