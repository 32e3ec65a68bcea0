# Each hospital's slides are that hospital's job; a failed slide is a row of the manifest
# (status failed, with the reason), not a failed job. The slides and annotations a hospital's
# list names are inputs too, so touching one reruns only that hospital's job and what
# depends on it.


def hospital_files(wildcards):
    """The slide and annotation files of the hospital's slide list."""
    if "demo_cohort" in config:
        checkpoints.demo_cohort.get()  # the lists exist once the demo cohort is written
    return slide_files(*HOSPITALS[wildcards.hospital])


rule preprocess:
    """One hospital's job: its slides to patch bags, a manifest and QC pictures."""
    input:
        slides=lambda wc: HOSPITALS[wc.hospital][0],
        annotations=lambda wc: HOSPITALS[wc.hospital][1] or [],
        files=hospital_files,
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
