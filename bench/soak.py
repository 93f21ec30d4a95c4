"""The fault soak: the seven fault scenarios of the README's failure table, plus Redis killed while
chunks render, each run again and again against one embedded stack, two real workers and a scheduler.

    .venv/bin/python bench/soak.py [--runs 20] [--only worker-killed,poison,...] [--s3-outage-s 15]

Each run renders a small fresh batch, injects its fault at its moment, then waits (at most
--settle-s) until every job is done or failed and nothing of the batch is queued, in flight or in a
worker's hands. Nobody runs `watch` or `reconcile`: the scheduler's periodic reconcile
(SDFARM_RECONCILE_AFTER_S=15 here) is the only safety net. Counted per scenario, each must be 0:

- lost: jobs without a PNG and its sidecar at the end (the poison job too: it fails after three
  deaths, then `retry` renders it);
- duplicated: a key stored twice, a sidecar that does not describe the stored PNG (an overwrite),
  progress counting more jobs done or rendered than the batch has;
- stalled: runs that did not settle in time;
- wrong: a scenario's own promise broken (the poison job not failed with its reason, the planted
  PNG overwritten, a worker that died unasked).

Reported, allowed: re-renders (work done twice after a kill or a double delivery) and jobs the
scheduler re-enqueued. One JSON line per run, then one per scenario. Not part of `make test`: the
default 20 runs of 8 scenarios take about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import MODEL, Farm, check_outputs, emit, start_farm
from producer.control import retry_failed
from producer.submit import record_batch, submit_plan
from sdfarm.batchfile import BatchPlan, plan_batch
from sdfarm.jobs import make_chunks
from sdfarm.layout import failed_key, image_key, sidecar_key
from sdfarm.queue import enqueue_chunks, in_flight, queue_depth

CHUNK = 4
FARM_ENV = {"SDFARM_CHUNK_SIZE": str(CHUNK), "SDFARM_CPU_THREADS": "1", "SDFARM_VISIBILITY_TIMEOUT": "20",
            "SDFARM_UNACKED_RESTORE_INTERVAL": "1", "SDFARM_HEARTBEAT_INTERVAL": "1", "SDFARM_S3_MAX_ATTEMPTS": "3",
            "SDFARM_RETRY_BACKOFF_S": "1", "SDFARM_RETRY_BACKOFF_MAX_S": "5"}
SCHEDULER_ENV = {"SDFARM_SCHEDULER_TICK_S": "1", "SDFARM_RECONCILE_AFTER_S": "15"}


class Stalled(Exception):
    """A run's wait ran out: what it waited for."""


@dataclass
class Run:
    """One run of a scenario: its batch, and what the scenario itself found wrong on the way."""

    plan: BatchPlan
    fault_at: int = 0  # jobs done or failed when the fault struck
    wrong: list[str] = field(default_factory=list)
    check: Callable[[], None] | None = None  # the scenario's own check once the batch has settled


class Soak:
    def __init__(self, farm: Farm, args: argparse.Namespace) -> None:
        self.farm = farm
        self.args = args
        self.serial = 0
        self.workers: list[str] = []
        self.last_plan: BatchPlan | None = None  # the batch of the run under way

    # --- the workers ---

    def start_worker(self) -> str:
        self.serial += 1
        name = f"w{self.serial}"
        self.farm.start_worker(name)
        self.workers.append(name)
        return name

    def replace(self, name: str) -> None:
        """SIGKILL a whole worker and start another in its place (it loads while the run goes on)."""
        self.farm.kill_worker(name)
        self.workers.remove(name)
        self.start_worker()

    def ready(self, wrong: list[str]) -> None:
        """Wait for two loaded workers; one that died unasked is noted and replaced."""
        for name in list(self.workers):
            if self.farm.workers[name].poll() is not None:
                wrong.append(f"worker {name} exited with {self.farm.workers[name].returncode}")
                self.workers.remove(name)
                self.start_worker()
        wait(lambda: all(self.farm.ready(n) for n in self.workers), 180, "the workers to load")

    def busy_with(self, batch_id: str) -> list[str]:
        return [n for n in self.workers if self.farm.beat(n).get("current_batch") == batch_id]

    # --- a batch ---

    def plan(self, name: str, count: int, steps: int) -> BatchPlan:
        items = "".join(f"  - {json.dumps(f'{name} job {i}')}\n" for i in range(count))
        text = (f"name: {name}\nseed: 11\ndefaults: {{model: {MODEL}, width: 64, height: 64, steps: {steps}}}\n"
                f"items:\n{items}")
        self.last_plan = plan_batch(text, f"{name}.yaml", "yaml", self.farm.registry, 1000)
        return self.last_plan

    def submit(self, name: str, count: int, steps: int) -> BatchPlan:
        plan = self.plan(name, count, steps)
        submit_plan(plan, self.farm.store, self.farm.app, self.farm.board, CHUNK)
        return plan

    def settled(self, batch_id: str) -> bool:
        """Every job done or failed, nothing of the batch queued, in flight or in a worker's hands."""
        try:
            p = self.farm.board.read(batch_id)
            return (p is not None and p.finished and queue_depth(self.farm.redis, MODEL) == 0
                    and in_flight(self.farm.redis, batch_id) is False and not self.busy_with(batch_id))
        except Exception:  # Redis is down
            return False

    def done_count(self, batch_id: str) -> int:
        return max(self.farm.done(batch_id), 0)

    # --- the scenarios (each returns once its fault is injected) ---

    def worker_killed(self, name: str, run: int) -> Run:
        """A worker SIGKILLed mid-chunk (odd runs: only its pool child); the other worker, or the
        replacement, renders the chunk again."""
        plan = self.submit(name, 8, steps=40)
        victim = wait(lambda: self.busy_with(plan.batch_id), 60, "a worker to take a chunk", 0.02)[0]
        at = self.done_count(plan.batch_id)
        if run % 2:
            os.kill(int(self.farm.beat(victim)["pid"]), signal.SIGKILL)
        else:
            self.replace(victim)
        return Run(plan, at)

    def poison(self, name: str, run: int) -> Run:
        """A job whose pool child dies at every render start: failed after 3 deaths with its reason,
        nothing written, then `retry` renders it."""
        plan = self.submit(name, 1, steps=150)
        job = plan.jobs[0]
        chunk_id = next(make_chunks(plan.batch_id, enumerate(plan.jobs), CHUNK)).id
        killed: set[int] = set()

        def rendering_child() -> int | None:
            for n in self.workers:
                beat = self.farm.beat(n)
                if beat.get("current_chunk") == chunk_id and int(beat.get("pid", 0)) not in killed:
                    return int(beat["pid"])
            return None

        for attempt in range(3):
            child = wait(rendering_child, 90, f"attempt {attempt + 1} to start rendering", 0.02)
            os.kill(child, signal.SIGKILL)
            killed.add(child)
        wait(lambda: (p := self.farm.progress(plan.batch_id)) is not None and p.failed == 1, 120,
             "the poison job to be failed")
        out = Run(plan)
        reason = self.farm.store.get_json(failed_key(plan.batch_id, job.id))["reason"]
        if "gave up after 3 attempts" not in reason:
            out.wrong.append(f"poison job failed with {reason!r}")
        if self.farm.store.exists(image_key(job.id)) or self.farm.store.exists(sidecar_key(job.id)):
            out.wrong.append("the poison job wrote outputs")
        retry_failed(self.farm.store, self.farm.board, self.farm.app, plan.batch_id)
        return out

    def s3_outage(self, name: str, run: int) -> Run:
        """S3 down for --s3-outage-s while the batch renders."""
        plan = self.submit(name, 16, steps=100)
        wait(lambda: self.done_count(plan.batch_id) >= CHUNK, 120, "the batch to be under way")
        at = self.done_count(plan.batch_id)
        self.farm.stack.kill_s3()
        pause(self.args.s3_outage_s)
        self.farm.stack.start_s3()
        return Run(plan, at)

    def redis_restart(self, name: str, run: int) -> Run:
        """Redis stopped (SIGTERM: it writes its AOF) and started again mid-batch."""
        plan = self.submit(name, 16, steps=100)
        wait(lambda: self.done_count(plan.batch_id) >= CHUNK, 120, "the batch to be under way")
        at = self.done_count(plan.batch_id)
        self.farm.stack.stop_redis()
        self.farm.stack.start_redis()
        return Run(plan, at)

    def png_without_sidecar(self, name: str, run: int) -> Run:
        """A dead attempt stored a job's PNG but not its sidecar: the rerun keeps that PNG and writes the
        sidecar that describes it."""
        plan = self.plan(name, 2, steps=6)
        job = plan.jobs[0]
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (run * 12 % 256, 0, 0)).save(buf, format="PNG")
        planted = buf.getvalue()
        self.farm.store.put_if_absent(image_key(job.id), planted, "image/png")
        submit_plan(plan, self.farm.store, self.farm.app, self.farm.board, CHUNK)
        out = Run(plan)

        def check() -> None:
            if self.farm.store.get(image_key(job.id)) != planted:
                out.wrong.append("the planted PNG was overwritten")

        out.check = check
        return out

    def double_delivery(self, name: str, run: int) -> Run:
        """The same chunk enqueued twice: both workers render it, each object is stored once."""
        plan = self.plan(name, 4, steps=40)
        self.farm.board.register(plan.batch_id, plan.name, len(plan.jobs))
        chunk = next(make_chunks(plan.batch_id, enumerate(plan.jobs), CHUNK))
        enqueue_chunks(self.farm.app, [chunk, chunk])
        return Run(plan)

    def messages_lost(self, name: str, run: int) -> Run:
        """A batch recorded whose messages Redis lost before any worker saw them: nobody watching,
        the scheduler reconciles it."""
        plan = self.plan(name, 8, steps=6)
        record_batch(plan, self.farm.store, self.farm.board)
        return Run(plan)

    def redis_killed_mid_chunk(self, name: str, run: int) -> Run:
        """Redis SIGKILLed while both workers render this batch's chunks, back 10 s later."""
        plan = self.submit(name, 8, steps=60)
        wait(lambda: len(self.busy_with(plan.batch_id)) == 2, 120, "both workers to render")
        at = self.done_count(plan.batch_id)
        self.farm.stack.kill_redis()
        pause(10)
        self.farm.stack.start_redis()
        return Run(plan, at)

    # --- one run, checked ---

    def run(self, scenario: str, run: int) -> dict[str, Any]:
        wrong: list[str] = []
        self.ready(wrong)
        renders_before = self.farm.renders()
        name = f"{scenario}-{run}"
        t0 = time.monotonic()
        stalled = ""
        self.last_plan = None
        fault_at = -1
        try:
            r = SCENARIOS[scenario](self, name, run)
            wrong += r.wrong
            fault_at = r.fault_at
            wait(lambda: self.settled(r.plan.batch_id), self.args.settle_s, "the batch to settle", 0.25)
            if r.check:
                r.check()
        except Stalled as e:
            stalled = str(e)
        assert self.last_plan is not None
        plan = self.last_plan
        seconds = time.monotonic() - t0
        outputs = check_outputs(self.farm.store, plan)
        p = self.farm.progress(plan.batch_id)
        jobs = len(plan.jobs)
        over = max(p.done - jobs, 0) + max(p.rendered - jobs, 0) if p else 0
        renders = self.farm.renders() - renders_before
        ids = {j.id for j in plan.jobs}
        return {"scenario": scenario, "run": run, "seconds": round(seconds, 1), "jobs": jobs, "fault_at_done": fault_at,
                "lost": len(outputs.missing), "duplicated": outputs.duplicate_objects + len(outputs.mismatched) + over,
                "stalled": int(bool(stalled)), "wrong": wrong + ([stalled] if stalled else []),
                "rerenders": sum(max(c - 1, 0) for k, c in renders.items() if k in ids),
                "reconciled_jobs": self.reconciled(plan.batch_id)}

    def reconciled(self, batch_id: str) -> int:
        text = self.farm.log_text("scheduler")
        return sum(int(n) for n in re.findall(rf"batch {batch_id}: .*reconciled, (\d+) of", text))


SCENARIOS: dict[str, Callable[[Soak, str, int], Run]] = {
    "worker-killed": Soak.worker_killed,
    "poison": Soak.poison,
    "s3-outage": Soak.s3_outage,
    "redis-restart": Soak.redis_restart,
    "png-without-sidecar": Soak.png_without_sidecar,
    "double-delivery": Soak.double_delivery,
    "messages-lost": Soak.messages_lost,
    "redis-killed-mid-chunk": Soak.redis_killed_mid_chunk,
}


def wait(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise Stalled(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
    return value


def pause(seconds: float) -> None:
    """The fault's duration: time passing is the condition here."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.2)


def summarise(results: list[dict[str, Any]]) -> None:
    for scenario in SCENARIOS:
        mine = [r for r in results if r["scenario"] == scenario]
        if mine:
            emit(summary=scenario, runs=len(mine), **{k: sum(r[k] for r in mine) for k in
                 ("lost", "duplicated", "stalled", "rerenders", "reconciled_jobs")},
                 wrong=sum(len(r["wrong"]) for r in mine), mean_s=round(sum(r["seconds"] for r in mine) / len(mine), 1),
                 max_s=max(r["seconds"] for r in mine))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    ap.add_argument("--s3-outage-s", type=float, default=15)
    ap.add_argument("--settle-s", type=float, default=240)
    args = ap.parse_args()
    chosen = args.only.split(",")
    if unknown := [s for s in chosen if s not in SCENARIOS]:
        ap.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    tmp = Path(tempfile.mkdtemp(prefix="sdfarm-soak-"))
    farm = start_farm(tmp, CHUNK, FARM_ENV)
    emit(stage="started", folder=str(tmp), runs=args.runs, scenarios=chosen)
    results: list[dict[str, Any]] = []
    try:
        soak = Soak(farm, args)
        soak.start_worker()
        soak.start_worker()
        farm.start_scheduler(SCHEDULER_ENV)
        for run in range(args.runs):  # round-robin: every scenario meets the farm in every state
            for scenario in chosen:
                results.append(soak.run(scenario, run))
                emit(**results[-1])
    except KeyboardInterrupt:
        pass
    finally:
        summarise(results)
        farm.stop()
    bad = sum(r["lost"] + r["duplicated"] + r["stalled"] + len(r["wrong"]) for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
