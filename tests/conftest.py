"""Shared fixtures. Prefect state for the whole test session lives in a temporary PREFECT_HOME."""

from __future__ import annotations

import json
import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="kiln-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME  # before anything imports prefect
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API + database for in-process flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_jsonl(path, records, raw_lines=()):
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """A small corpus: good JSONL records, a text file, and one broken record of each kind."""
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "good.jsonl", [{"id": f"doc-{i}", "text": f"Document number {i} has some words."} for i in range(20)])
    (d / "notes.txt").write_text("A plain text file is one document.\n", encoding="utf-8")
    write_jsonl(
        d / "bad.jsonl",
        [{"id": "kept", "text": "fine"}, {"id": "e", "text": "  "}, {"id": "n", "text": 7}, {"id": "m"}],
        raw_lines=[b'{"text": "caf\xe9"}', b"{oops", b"[1, 2]"],
    )
    return d
