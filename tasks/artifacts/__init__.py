"""The artifact store: content-addressed, immutable stage outputs.

- `fingerprint` -- what determines an artifact's content, hashed (its path and cache key);
- `stats`       -- a unit's and an artifact's accounting (`StageStats`);
- `read`        -- committed artifacts (`Artifact`) and one unit's rows of an input (`read_unit`);
- `write`       -- a unit's writer: kept rows, the one reject path, named tables (`ArtifactWriter`);
- `store`       -- staging, unit markers and locks, unit reuse, the commit, the store (`ArtifactStore`).
"""

from tasks.artifacts.fingerprint import FINGERPRINT_CHARS, canonical_json, fingerprint
from tasks.artifacts.paths import (
    DATA_TABLE,
    MANIFEST,
    NO_REUSE,
    REJECTS_DIR,
    SCRATCH_DIR,
    UNITS_DIR,
    ArtifactError,
)
from tasks.artifacts.read import Artifact, pick, read_unit, unit_first_row
from tasks.artifacts.stats import StageStats
from tasks.artifacts.store import ArtifactStore, Staging, UnitBusy, staging_for_directory
from tasks.artifacts.write import (
    MAX_REJECT_TEXT_CHARS,
    REJECT_SCHEMA,
    ArtifactWriter,
    RowBatcher,
    ShardWriter,
)

__all__ = [
    "DATA_TABLE",
    "FINGERPRINT_CHARS",
    "MANIFEST",
    "MAX_REJECT_TEXT_CHARS",
    "NO_REUSE",
    "REJECTS_DIR",
    "REJECT_SCHEMA",
    "SCRATCH_DIR",
    "UNITS_DIR",
    "Artifact",
    "ArtifactError",
    "ArtifactStore",
    "ArtifactWriter",
    "RowBatcher",
    "ShardWriter",
    "Staging",
    "StageStats",
    "UnitBusy",
    "canonical_json",
    "fingerprint",
    "pick",
    "read_unit",
    "staging_for_directory",
    "unit_first_row",
]
