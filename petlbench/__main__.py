"""`python -m petlbench` is the same as the `petlbench` command."""

from petlbench.cli.app import main

main()
