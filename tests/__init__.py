"""
Tests of dmq-bus.

Importing this package registers the deterministic hypothesis profile
C{dmq} and loads it, so that every run explores the same examples and no
example database is written. Set C{HYPOTHESIS_PROFILE} to load another
registered profile (C{default}, C{ci}, ...) instead.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dmq",
    derandomize=True,
    deadline=None,
    max_examples=200,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dmq"))
