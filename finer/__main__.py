"""`python -m finer` runs the command line."""

from finer.cli import main

main()
