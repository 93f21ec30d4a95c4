from __future__ import annotations

import subprocess
import sys


def test_producer_does_not_import_torch_or_worker() -> None:
    code = (
        "import sys, producer, producer.cli, producer.fetch, producer.watch, sdfarm.batchfile, sdfarm.queue;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'worker') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
