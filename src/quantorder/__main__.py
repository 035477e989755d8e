"""`python -m quantorder ...`: the same as the `quantorder` command."""

from quantorder.cli import main

main()
