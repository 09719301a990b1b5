"""Prefect flows (evolve, round, evaluate) and the `kaizen` command line; the outermost layer."""
