import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# ci (the default) draws 40 examples per property, except the slow properties, which ask for fewer through
# helpers.examples(n) under ci only; thorough (HYPOTHESIS_PROFILE=thorough) draws 300 for every property.
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
