"""timm's transformer families at small sizes: pruning at 0.25 is masked-equivalent and cuts MACs.

The same check produces the README's coverage table (``python benchmarks/zoo.py --markdown``).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo import FAMILIES, check  # noqa: E402


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_prunes_equal_to_masked(family):
    torch.manual_seed(0)
    name, kwargs = FAMILIES[family]
    row = check(name, kwargs)
    assert row["status"] == "supported", row.get("reason")
    assert row["error"] < 1e-4 and row["macs_kept"] < 1.0
