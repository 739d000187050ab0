"""``python -m kdcache``: the command line, as ``kdcache`` (and what ``torchrun -m kdcache train`` runs)."""

from kdcache.cli import main

main()
