"""`python -m services.cli`: the `livegifts` command without its console script."""

from services.cli.main import main

main()
