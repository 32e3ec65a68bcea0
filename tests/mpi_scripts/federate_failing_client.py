"""Run by tests/federation/test_federate_mpi.py under ``mpiexec``: ``slidefed federate`` in
which one client fails mid-run.

It registers a test-only algorithm, ``regular_failing_on_client_2`` — Regular, except that
client 2 raises in round 2 after writing the time to stderr — then hands its arguments to the
real command line, so the failure travels the product's own path (``run_guarded``).
"""

from __future__ import annotations

import sys
import time

from federation.algorithms import Losses, register_algorithm
from federation.algorithms.regular import Regular
from slidefed.cli import main


@register_algorithm("regular_failing_on_client_2")
class RegularFailingOnClient2(Regular):
    def run_round(self, round: int) -> Losses:
        if round == 1 and 2 in self.clients:
            sys.stderr.write(f"failing at {time.time()}\n")
            sys.stderr.flush()
            raise RuntimeError("client 2 lost its data disk")
        return super().run_round(round)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
