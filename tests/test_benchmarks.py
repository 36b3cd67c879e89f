"""The benchmark scripts refuse nonsensical options before doing any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCF_SPEED = Path(__file__).resolve().parents[1] / 'benchmarks' / 'scf_speed.py'


@pytest.mark.parametrize(('value', 'message'), [('0', 'must be at least 1, got 0'), ('two', 'invalid')])
def test_scf_speed_refuses_a_bad_repeat_count(value, message):
    result = subprocess.run(
        [sys.executable, str(SCF_SPEED), '--repeat', value], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    assert '--repeat' in result.stderr and message in result.stderr
