"""Test-session settings: property tests draw the same examples on every run, so that a red CI
always reproduces locally (``HYPOTHESIS_PROFILE=explore`` draws fresh examples instead)."""

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
