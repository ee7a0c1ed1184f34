"""Kiln flows: Prefect composition of the stages in `tasks/`."""
