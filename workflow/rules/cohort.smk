# The synthetic demo cohort, only when the config has a `demo_cohort:` block: it writes the
# slide lists that `hospitals:` names. A checkpoint, because the slides those lists name are
# the preprocessing jobs' inputs, known only once the lists exist.

if "demo_cohort" in config:
    DEMO = config["demo_cohort"]
    # Optional keys become options; slides_per_hospital is one number or one per hospital.
    DEMO_OPTIONS = {
        key: " ".join(map(str, value)) if isinstance(value, list) else value
        for key, value in DEMO.items()
        if key in ("slides_per_hospital", "size_um", "tumour_contrast")
    }

    checkpoint demo_cohort:
        """Synthetic H&E slides, labels.csv and tumour annotations per hospital."""
        output:
            [slides for slides, _ in HOSPITALS.values()],
        params:
            root=f"{OUT}/cohort",
            options=" ".join(
                f"--{key.replace('_', '-')} {value}" for key, value in DEMO_OPTIONS.items()
            ),
        # A number, not workflow.cores, which a cluster executor leaves undefined; a local run
        # with fewer cores (`-c2`) lowers it to those.
        threads: 8
        log:
            f"{OUT}/logs/demo_cohort.log",
        benchmark:
            f"{OUT}/benchmarks/demo_cohort.tsv"
        shell:
            "slidefed demo-cohort -o {params.root} --hospitals {DEMO[hospitals]} "
            "--seed {DEMO[seed]} {params.options} --workers {threads} > {log} 2>&1"
