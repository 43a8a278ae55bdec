"""The README's test command runs from a bare clone: no test reads outside the repository.

Test data that once lived beside the checkout (KubeRay CRDs in ../shared/) is vendored under
the repository with its source, version and checksums; this test fails when a test (or a
conftest) reaches for the old location again, or when a vendored file no longer matches the
checksum its SOURCE.md records.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Ways a test could reach outside the clone: the shared folder next to it, the machine's
# workspace, or a parents[n] climb above the repository root.
OUTSIDE = [
    re.compile(r"""["']\.\./shared"""),
    re.compile(r"""parent\s*/\s*["']shared["']"""),
    re.compile(r"""["']/work/"""),
    re.compile(r"""parents\[[3-9]\]"""),
]


def _test_sources() -> list[Path]:
    return sorted((REPO_ROOT / "tests").rglob("*.py"))


def outside_references(text: str) -> list[str]:
    return [m.group(0) for pattern in OUTSIDE for m in pattern.finditer(text)]


def test_no_test_reads_outside_the_repository():
    found = {
        str(p.relative_to(REPO_ROOT)): refs
        for p in _test_sources()
        if p.name != Path(__file__).name and (refs := outside_references(p.read_text()))
    }
    assert not found, f"tests that read outside the clone: {found}; vendor the data into the repository"


@pytest.mark.parametrize("text", [
    'KUBERAY = REPO_ROOT.parent / "shared" / "schemas"',
    'open("../shared/schemas/kuberay/x.yaml")',
    'Path("/work/shared/models")',
])
def test_the_scan_catches_outside_paths(text):
    assert outside_references(text)


def test_vendored_crds_match_their_recorded_checksums():
    crds = REPO_ROOT / "cluster" / "kuberay" / "crds"
    recorded = dict(re.findall(r"`([0-9a-f]{64})` \((\w+)\)", (crds / "SOURCE.md").read_text()))
    by_kind = {kind: digest for digest, kind in recorded.items()}
    assert set(by_kind) == {"rayclusters", "rayjobs"}, recorded
    for kind, digest in by_kind.items():
        actual = hashlib.sha256((crds / f"ray.io_{kind}.yaml").read_bytes()).hexdigest()
        assert actual == digest, f"cluster/kuberay/crds/ray.io_{kind}.yaml changed without SOURCE.md"
