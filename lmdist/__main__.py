"""`python -m lmdist ...` is the `lmdist` command (so `torchrun -m lmdist eval ...` works)."""
from lmdist.cli import main

main()
