"""`python -m semmae_jax COMMAND ...`: the same as `python main.py` and the installed `semmae` command."""

from semmae_jax.cli import main

main()
