"""Console output as cluster logs see it (not a terminal): one record per line, never wrapped."""
from __future__ import annotations

import subprocess
import sys


def test_output_to_a_file_is_not_wrapped_at_80_columns():
    line = "epoch 3/30 batch 390/390  " + "  ".join(f"metric_{i} {i}.123" for i in range(12)) + "  img/s 4.139"
    assert len(line) > 150
    code = f"from advtrain.logging import console as c; c.console.print({line!r}, markup=False)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == line + "\n"
