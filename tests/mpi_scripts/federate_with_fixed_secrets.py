"""Run by tests/federation/test_federate_mpi.py under ``mpiexec``: the ``slidefed`` command
line with every hospital's secret stream keyed by a test seed (``fixed_secrets_for_tests``), so
that an MPI run and a local run draw the same DP noise and can be compared byte for byte.

    python federate_with_fixed_secrets.py SLIDEFED-ARGUMENTS...
"""

from __future__ import annotations

import sys

from federation.privacy.randomness import fixed_secrets_for_tests
from slidefed.cli import main

if __name__ == "__main__":
    with fixed_secrets_for_tests(0):
        sys.exit(main(sys.argv[1:]))
