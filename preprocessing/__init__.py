"""Per-hospital preprocessing jobs: a slide to a patch bag, a slide list to bags + manifest + QC."""
