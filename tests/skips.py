"""Skipping what this machine cannot do, except under CI, where a skip would hide a behaviour.

Under CI=true (how CI runs the suite) every one of these is a failure saying what is missing:
a CI runner that silently skips a test tests nothing.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

UNDER_CI = os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running test because `reason`; under CI, fail it instead."""
    if UNDER_CI:
        pytest.fail(f"cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def needs(condition: bool, reason: str) -> pytest.MarkDecorator:
    """A mark that skips the test where `condition` is false; under CI it runs (and fails)."""
    return pytest.mark.skipif(not condition and not UNDER_CI, reason=reason)
