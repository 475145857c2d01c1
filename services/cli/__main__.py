"""`python -m services.cli`: the `livegifts` command without its console script."""

from services.cli import entry_point

entry_point()
