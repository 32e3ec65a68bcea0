"""``python -m slidefed``: the ``slidefed`` console script, e.g. for each rank under mpiexec."""

from slidefed.cli import console_main

if __name__ == "__main__":
    console_main()
