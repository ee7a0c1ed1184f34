"""Kiln stages: each sub-package holds one stage's pure logic (no Prefect inside) plus its config."""
