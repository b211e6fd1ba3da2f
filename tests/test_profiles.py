"""The hypothesis profile governs every property test; slow ones ask for fewer examples under ``ci`` only."""
import re
from pathlib import Path

from hypothesis import settings

from helpers import examples


def test_slow_properties_get_the_profiles_count_outside_ci():
    assert examples(15, profile="ci") == 15
    assert examples(15, profile="thorough") == settings.get_profile("thorough").max_examples == 300
    current = settings.get_current_profile_name() if hasattr(settings, "get_current_profile_name") else None
    if current is not None:
        assert examples(15) == (15 if current == "ci" else settings.default.max_examples)


def test_no_property_test_fixes_its_own_example_count():
    fixed = [f"{path.name}:{line}" for path in sorted(Path(__file__).parent.glob("test_*.py"))
             for line, text in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"max_examples\s*=(?!=)(?!\s*examples\()", text)]
    assert not fixed, f"use max_examples=examples(n) so that HYPOTHESIS_PROFILE=thorough governs: {fixed}"
