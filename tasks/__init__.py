"""Prefect tasks: one thin task per pipeline stage, each a decorator around a call into the core."""
