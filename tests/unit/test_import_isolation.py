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


def test_worker_start_up_modules_do_not_import_diffusers() -> None:
    """The prefork parent imports these; diffusers' and transformers' imports ask torch whether CUDA
    is available, which initialises the driver and leaves the pool child unable to use the GPU."""
    code = (
        "import sys, worker.main, worker.tasks, worker.pipeline, worker.render;"
        "bad = [m for m in ('diffusers', 'transformers', 'peft', 'spandrel') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
