# Slide-level training: one MPI job per algorithm of `federation.algorithms`, a rank per
# hospital. The launcher is the `mpi` resource (default `mpiexec`; the SLURM profile sets
# `srun --mpi=pmi2`); the federation stops at start if the world it finds has more ranks than
# hospitals, or is several worlds of one. A relative `federation.config` is relative to the Snakefile.

if FEDERATION:

    rule federate:
        """All hospitals' models, trained together: one MPI rank per hospital. A job
        interrupted after a checkpoint (a SLURM time limit) resumes from it when rerun."""
        input:
            manifests=MANIFESTS,
            config=os.path.join(workflow.basedir, FEDERATION["config"]),
        output:
            f"{RUNS}/{{algorithm}}/summary.json",
        params:
            ranks=len(HOSPITALS),
            options=lambda wc: federate_options(config, wc.algorithm),
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
            "{params.options} --resume > {log} 2>&1"
