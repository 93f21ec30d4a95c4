from __future__ import annotations

import subprocess
import sys


def imported(modules: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after importing `modules`."""
    code = f"import sys, {modules}; print(','.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_producer_does_not_import_torch_or_worker() -> None:
    assert imported("producer, producer.cli, producer.fetch, producer.watch, sdfarm.batchfile, sdfarm.queue",
                    ("torch", "diffusers", "transformers", "worker")) == []


def test_worker_start_up_modules_do_not_import_diffusers() -> None:
    """The prefork parent imports these; diffusers' and transformers' imports ask torch whether CUDA
    is available, which initialises the driver and leaves the pool child unable to use the GPU."""
    assert imported("worker.main, worker.tasks, worker.pipeline, worker.render",
                    ("diffusers", "transformers", "peft", "spandrel")) == []


def test_the_worker_commands_of_sdfarm_exec_sdfarm_worker() -> None:
    """`sdfarm worker`, `make-tiny-model` and `reproduce` become `sdfarm-worker ...` (worker/cli.py):
    the producer reaches the worker package only through that exec."""
    for command, shown in (("worker", "serve"), ("make-tiny-model", "make-tiny-model"), ("reproduce", "reproduce")):
        out = subprocess.run([sys.executable, "-m", "producer", command, "--help"], capture_output=True, text=True,
                             check=True)
        assert out.stdout.startswith(f"Usage: sdfarm-worker {shown} [OPTIONS]"), out.stdout


def test_the_worker_command_line_does_not_import_diffusers() -> None:
    assert imported("worker.cli", ("diffusers", "transformers", "torch")) == []
