"""`python -m convert ...`: see `convert.cli`."""

from convert.cli import main

main()
