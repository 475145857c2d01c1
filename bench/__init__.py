"""`make bench`: a load generator, this machine's ceilings, and the report (see bench/README.md)."""
