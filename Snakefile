# slidefed end-to-end workflow. Default: the synthetic demo cohort (configs/demo.yaml).
#   snakemake -c2                                              # demo, 2 cores
#   snakemake -c8 --configfile configs/my_cohort.yaml          # your cohort
#   snakemake --profile configs/slurm --configfile ...         # on a SLURM cluster
#   snakemake --report results/snakemake_report.zip            # after a run: Snakemake's own
# Every rule calls the `slidefed` command line; the logic lives in the package. The data
# flow: cohort (demo only) -> preprocess (a job per hospital) -> federate (an MPI job per
# algorithm, a rank per hospital) -> evaluate -> heatmap -> report (one HTML page of it all).

import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from slidefed.workflow import (
    WorkflowConfigError,
    check_config,
    config_problem,
    federate_options,
    preprocess_options,
    slide_files,
    slide_lists,
)

# `slidefed` and `mpiexec` are installed beside the Python that runs Snakemake (the project's
# virtual environment): put them first on the jobs' PATH, so `.venv/bin/snakemake` works
# without activating the environment.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable),
                                      os.environ.get("PATH", "")])

# The demo is the default; a cohort config (--configfile) replaces it rather than merging
# with it, so a real cohort never inherits the demo's hospitals.
if "hospitals" not in config:

    configfile: "configs/demo.yaml"


# A misconfigured cohort fails here, in one line, before any job runs.
try:
    validate(config, "workflow/schemas/config.schema.yaml")
    check_config(config, workflow.basedir)
except (WorkflowError, WorkflowConfigError) as error:
    raise WorkflowError(config_problem(error)) from None

OUT = config["output_dir"]
HOSPITALS = slide_lists(config)  # name -> (slide folder or CSV, annotation folder or None)
MANIFESTS = expand(f"{OUT}/preprocessed/{{hospital}}/manifest.csv", hospital=HOSPITALS)
# Without a `federation:` block the workflow stops after preprocessing.
FEDERATION = config.get("federation")
ALGORITHMS = FEDERATION["algorithms"] if FEDERATION else []
RUNS = f"{OUT}/federation"
REPORT = config["report"]


localrules:
    all,


rule all:
    input:
        MANIFESTS,
        expand(f"{RUNS}/{{algorithm}}/slide_metrics.json", algorithm=ALGORITHMS),
        expand(f"{RUNS}/{{algorithm}}/heatmaps.csv", algorithm=ALGORITHMS),
        f"{OUT}/report.html",


include: "workflow/rules/cohort.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/federate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/heatmap.smk"
include: "workflow/rules/report.smk"
