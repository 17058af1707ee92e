"""The W3C RDF 1.1 syntax suites (vendored in tests/data/w3c, see its README): every positive test ingests,
every negative one is refused in one line with the store left as it was, nothing else escapes (issue 14)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import w3c_syntax  # noqa: E402

SUITES = ROOT / "tests" / "data" / "w3c"
# tests per suite in the vendored manifests (positive, negative): a shrunken copy would fail here
SIZES = {"rdf-turtle": (219, 94), "rdf-trig": (241, 115), "rdf-n-triples": (41, 29), "rdf-n-quads": (53, 34),
         "rdf-xml": (126, 40)}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    return w3c_syntax.seeded_store(tmp_path_factory.mktemp("w3c"))


@pytest.mark.parametrize("suite", sorted(w3c_syntax.SUITES))
def test_every_test_of_the_suite_behaves(suite, seeded):
    counts, failures = w3c_syntax.run_suite(SUITES / suite, w3c_syntax.SUITES[suite], seeded)
    assert failures == []
    positive, negative = SIZES[suite]
    assert (counts[(False, True)], counts[(True, True)]) == (positive, negative)
