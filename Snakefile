# slidefed end-to-end workflow. Default: the synthetic demo cohort (configs/demo.yaml).
#   snakemake -c2                                      # demo, 2 cores
#   snakemake -c8 --configfile configs/my_cohort.yaml  # your cohort
# Every rule calls the `slidefed` command line; the logic lives in the package.

import os

# The demo is the default; a cohort config (--configfile) replaces it rather than merging
# with it, so a real cohort never inherits the demo's hospitals.
if "hospitals" not in config:

    configfile: "configs/demo.yaml"


OUT = config["output_dir"]
HOSPITALS = config["hospitals"]
TILING = config.get("tiling", {})
TILING_ARGS = " ".join(
    f"--{key.replace('_', '-')} {value}" for key, value in TILING.items()
)


# Slide-level training and evaluation: one MPI job per algorithm (a rank per hospital), then
# `slidefed evaluate`. Without a `federation:` block the workflow stops after preprocessing.
# A relative `federation.config` path is relative to this Snakefile, like configs/demo.yaml.
FEDERATION = config.get("federation")
ALGORITHMS = FEDERATION["algorithms"] if FEDERATION else []
FEDERATION_CONFIG = (
    os.path.join(workflow.basedir, FEDERATION["config"]) if FEDERATION else None
)
RUNS = f"{OUT}/federation"


rule all:
    input:
        expand(f"{OUT}/preprocessed/{{hospital}}/manifest.csv", hospital=HOSPITALS),
        expand(f"{RUNS}/{{algorithm}}/slide_metrics.json", algorithm=ALGORITHMS),


if "demo_cohort" in config:
    DEMO = config["demo_cohort"]
    # Optional keys become options; slides_per_hospital is one number or one per hospital.
    DEMO_OPTIONS = {
        key: " ".join(map(str, value)) if isinstance(value, list) else value
        for key, value in DEMO.items()
        if key in ("slides_per_hospital", "size_um", "tumour_contrast")
    }

    rule demo_cohort:
        output:
            [HOSPITALS[h] for h in HOSPITALS],
        params:
            root=f"{OUT}/cohort",
            options=" ".join(
                f"--{key.replace('_', '-')} {value}" for key, value in DEMO_OPTIONS.items()
            ),
        threads: workflow.cores
        log:
            f"{OUT}/logs/demo_cohort.log",
        shell:
            "slidefed demo-cohort -o {params.root} --hospitals {DEMO[hospitals]} "
            "--seed {DEMO[seed]} {params.options} --workers {threads} > {log} 2>&1"


rule preprocess:
    """One hospital's job: its slides to patch bags, a manifest and QC pictures."""
    input:
        slides=lambda wc: HOSPITALS[wc.hospital],
    output:
        manifest=f"{OUT}/preprocessed/{{hospital}}/manifest.csv",
    params:
        out=f"{OUT}/preprocessed/{{hospital}}",
        tiling=TILING_ARGS,
    threads: config.get("preprocess_workers", 1)
    log:
        f"{OUT}/logs/preprocess_{{hospital}}.log",
    shell:
        "slidefed preprocess --hospital {wildcards.hospital} --slides {input.slides} "
        "-o {params.out} --workers {threads} {params.tiling} > {log} 2>&1"


if FEDERATION:

    rule federate:
        """All hospitals' models, trained together: one MPI rank per hospital. A job
        interrupted after a checkpoint (a SLURM time limit) resumes from it when rerun."""
        input:
            manifests=expand(
                f"{OUT}/preprocessed/{{hospital}}/manifest.csv", hospital=HOSPITALS
            ),
            config=FEDERATION_CONFIG,
        output:
            f"{RUNS}/{{algorithm}}/summary.json",
        params:
            ranks=len(HOSPITALS),
            out=f"{RUNS}/{{algorithm}}",
            data=f"{OUT}/preprocessed",
            hospitals="[" + ",".join(HOSPITALS) + "]",
            overrides=" ".join(f"--set {o}" for o in FEDERATION.get("set", [])),
        threads: len(HOSPITALS)
        resources:
            mpi="mpiexec",
            tasks=len(HOSPITALS),
        log:
            f"{OUT}/logs/federate_{{algorithm}}.log",
        benchmark:
            f"{OUT}/benchmarks/federate_{{algorithm}}.tsv"
        shell:
            "{resources.mpi} -n {params.ranks} slidefed federate --config {input.config} "
            "--set algorithm={wildcards.algorithm} --set output_dir={params.out} "
            "--set data.root={params.data} --set data.hospitals={params.hospitals} "
            "--set clients={params.ranks} {params.overrides} --resume > {log} 2>&1"

    rule evaluate:
        """Slide-level diagnosis per hospital and pooled, with bootstrap intervals."""
        input:
            f"{RUNS}/{{algorithm}}/summary.json",
        output:
            f"{RUNS}/{{algorithm}}/slide_metrics.json",
        params:
            run=f"{RUNS}/{{algorithm}}",
        log:
            f"{OUT}/logs/evaluate_{{algorithm}}.log",
        benchmark:
            f"{OUT}/benchmarks/evaluate_{{algorithm}}.tsv"
        shell:
            "slidefed evaluate {params.run} > {log} 2>&1"
