# mypy: disallow-untyped-calls=False
"""The farm end to end on one GPU, beside a bare diffusers loop on the same weights, in one run.

    python bench/gpu_farm.py [--budget 300] [--jobs 160] [--chunk 8] [--sdxl] [--tiny [--compile-on-cpu]]

Real architectures with random weights (compute does not depend on weight values), fp16 on CUDA:
SD1.5 at 512x512, 30 steps, DPM++ 2M, CFG 7; with --sdxl also SDXL at 1024x1024 (32 jobs, chunks of 4).
What it runs, in this order, each stage only while the budget leaves it time:
  env        library versions and the GPU (nvidia-smi; this process never initialises CUDA)
  model      the random-weight pipeline written as a diffusers folder (fp16)
  baseline   a bare StableDiffusionPipeline loop, 1 and 8 images per call, each image saved as PNG
  farm       `sdfarm stack up`, one `sdfarm worker --device cuda:0`, two chunks to warm up, then
             `sdfarm submit BATCH --watch` of --jobs jobs: images/s from submit until every sidecar is
             in S3; GPU busy % over that window (nvidia-smi sampled every 250 ms); images/s of the
             render calls alone and PNG encoding time (from the sidecars). First SDFARM_COMPILE=1,
             then SDFARM_COMPILE=0 with 2/5 of the jobs (the same job ids), each on a fresh stack.
  worker_up  seconds from `sdfarm worker` until its heartbeat (model loaded; compiled: warm-up graphs
             built). Compiled: cold (empty SDFARM_CACHE_DIR), then warm (restarted on the same cache).
  compiled_vs_eager  the same jobs' PNGs from the two farms: mean and max absolute difference
  summary    the issue's targets (>= 8 images/s, >= 2x the batch-8 loop, GPU busy >= 95%, warm start <= 30 s)
Each figure is one JSON line on stdout, appended to $OUT/results.jsonl; nvidia-smi samples go to
$OUT/gpu_util.csv, submit outputs and worker log tails to $OUT/farm.txt. The model building and the
bare loop run in spawned child processes, so the GPU is free when the farm starts.

--tiny runs the same steps on the CPU with the project's tiny models (64x64, 8 steps, 32 jobs) in a
couple of minutes; the second farm then runs eager as well (its images must equal the first's),
unless --compile-on-cpu. bench/gpu/run.sh runs this on a lent GPU after tests/gpu.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdfarm.layout import worker_key  # noqa: E402

T0 = float(os.environ.get("GPU_FARM_T0") or time.time())  # main() passes it on: spawned children share the clock
PROMPTS = ["a lighthouse on a cliff at dusk, photo", "a red fox in fresh snow, telephoto", "a bowl of ramen, steam",
           "a neon street market at night", "a watercolor map of an island", "a cat in a reading nook",
           "a steam locomotive crossing a bridge", "glass towers at sunrise, aerial view"]
NEGATIVE = "blurry, low quality"
SUBMIT_BASE_S, SUBMIT_PER_JOB_S = 120, 1.0  # a batch's time limit: a recompile, then 4x the eager SD1.5 rate
TARGETS = {"sd15_images_per_s": 8.0, "sdxl_images_per_s": 1.2, "vs_baseline_batch8": 2.0, "gpu_busy_pct": 95.0,
           "warm_start_s": 30.0}


def out() -> Path:
    """$OUT: main() makes a temporary folder when it is not set (spawned children inherit it)."""
    return Path(os.environ["OUT"])


def emit(**figure: Any) -> dict[str, Any]:
    figure["t"] = round(time.time() - T0, 1)
    line = json.dumps(figure)
    print(line, flush=True)
    with (out() / "results.jsonl").open("a") as f:
        f.write(line + "\n")
    return figure


@dataclass(frozen=True)
class Spec:
    """One architecture's run: its size, steps and chunk, and how many images each measurement takes."""

    family: str  # sd15 | sdxl (the registry's family)
    tiny: bool
    size: int
    steps: int
    jobs: int  # the compiled farm's measured batch
    eager_jobs: int  # the eager farm's: the same batch's first jobs of each prompt (the same job ids)
    chunk: int
    baseline: tuple[tuple[int, int], ...]  # (images per call, images timed)
    needs: dict[str, int]  # seconds a stage takes: it starts only if the budget has them left

    @property
    def device(self) -> str:
        return "cpu" if self.tiny else "cuda:0"


def specs(args: argparse.Namespace) -> list[Spec]:
    if args.tiny:
        jobs = args.jobs or 32
        needs = {"model": 10, "baseline": 20, "compiled": 40, "eager": 40}
        sd15 = Spec("sd15", True, 64, 8, jobs, jobs, args.chunk, ((1, 8), (8, 32)), needs)
        sdxl = Spec("sdxl", True, 64, 8, 16, 16, 4, ((1, 4), (4, 16)), needs)
    else:  # estimates for an H100/H200: a cold compile of the UNet and the VAE decoder takes minutes
        jobs = args.jobs or 160
        sd15 = Spec("sd15", False, 512, 30, jobs, jobs * 2 // 5, args.chunk, ((1, 8), (8, 32)),
                    {"model": 30, "baseline": 40, "compiled": 150, "eager": 60})
        sdxl = Spec("sdxl", False, 1024, 30, 32, 16, 4, ((1, 4), (4, 16)),
                    {"model": 60, "baseline": 60, "compiled": 240, "eager": 90})
    return [sd15, sdxl] if args.sdxl else [sd15]


def left(budget: float) -> float:
    return budget - (time.time() - T0)


# --- in spawned children: the model and the bare loop (torch and CUDA live only there) ---------------


def build_model(folder: str, family: str, tiny: bool) -> None:
    """The random-weight pipeline as a diffusers folder: the project's tiny one, or the real
    architecture (bench/render_features.py's, built on the GPU, saved in fp16)."""
    import torch

    from bench.render_features import build_full
    from worker.testing import build_tiny

    if tiny:
        pipe = build_tiny(family)
    else:  # random initialisation of billions of weights: seconds on a GPU, a minute on a CPU
        try:
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                pipe = build_full(family).to(torch.float16)
        except Exception as e:
            emit(stage="model", family=family, warning=f"built on the CPU: on the GPU {type(e).__name__}: {e}")
            pipe = build_full(family).to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    emit(stage="model", family=family, tiny=tiny, unet_params=sum(p.numel() for p in pipe.unet.parameters()),
         dtype=str(pipe.unet.dtype))


def bare_loop(folder: str, spec: Spec) -> None:
    """What a user's own script does: the pipeline in fp16, N prompts per call, each image saved as PNG."""
    import diffusers
    import torch

    cuda = not spec.tiny and torch.cuda.is_available()
    cls = diffusers.StableDiffusionXLPipeline if spec.family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float16 if cuda else torch.float32, local_files_only=True)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # DPM++ 2M
    pipe.set_progress_bar_config(disable=True)
    saved = Path(tempfile.mkdtemp(prefix="bare-loop-"))

    def call(first: int, n: int) -> list[Image.Image]:
        images: list[Image.Image] = pipe(
            [f"{PROMPTS[(first + i) % len(PROMPTS)]} {first + i}" for i in range(n)], negative_prompt=[NEGATIVE] * n,
            num_inference_steps=spec.steps, guidance_scale=7.0, width=spec.size, height=spec.size,
            generator=[torch.Generator("cpu").manual_seed(first + i) for i in range(n)]).images
        return images

    for per_call, count in spec.baseline:
        call(0, per_call)  # lazy initialisation, cuDNN/cuBLAS heuristics
        t = time.perf_counter()
        for first in range(0, count, per_call):
            for i, image in enumerate(call(first, per_call)):
                image.save(saved / f"{first + i}.png")
        dt = time.perf_counter() - t
        emit(stage="baseline", family=spec.family, per_call=per_call, images=count, size=spec.size, steps=spec.steps,
             seconds=round(dt, 2), images_per_s=round(count / dt, 3))
    shutil.rmtree(saved, ignore_errors=True)


def in_child(fn: Callable[..., None], *args: Any, timeout: float) -> None:
    """Run fn in a spawned process (its own CUDA context, freed when it exits)."""
    proc = multiprocessing.get_context("spawn").Process(target=fn, args=args)
    proc.start()
    proc.join(max(timeout, 1))
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"{fn.__name__} ran past its {timeout:.0f}s")
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} exited with {proc.exitcode}")


# --- the GPU's utilisation -------------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi every 250 ms for the whole run, into $OUT/gpu_util.csv; busy % over any window."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        smi = shutil.which("nvidia-smi")
        if smi is None or not enabled:
            return
        line_buffered = [b, "-oL"] if (b := shutil.which("stdbuf")) else []
        with path.open("wb") as sink:
            self.proc = subprocess.Popen(
                [*line_buffered, smi, "--query-gpu=timestamp,utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "250"], stdout=sink, stderr=subprocess.DEVNULL)

    def samples(self) -> list[tuple[float, float, float]]:
        """(unix time, utilisation %, memory MiB) per sample so far."""
        rows = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            parts = [p.strip() for p in line.split(",")]
            try:
                stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((stamp, float(parts[1]), float(parts[2])))
            except (ValueError, IndexError):
                continue
        return rows

    def busy(self, start: float, end: float) -> dict[str, Any]:
        if self.proc is None:
            return {"gpu_busy_pct": None}
        deadline = time.time() + 3
        while (not (rows := self.samples()) or rows[-1][0] < end) and time.time() < deadline:
            time.sleep(0.25)  # the samples after `end` are still being written
        window = [r for r in rows if start <= r[0] <= end]
        if not window:
            return {"gpu_busy_pct": None, "gpu_samples": 0}
        return {"gpu_busy_pct": round(sum(r[1] for r in window) / len(window), 1), "gpu_samples": len(window),
                "gpu_mem_max_mib": max(r[2] for r in window)}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


# --- the farm, through its command line ---------------------------------------------------------------


def sdfarm(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer", *args], env=env, cwd=ROOT, text=True, check=False,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=max(timeout, 5))


def note(title: str, text: str) -> None:
    with (out() / "farm.txt").open("a") as f:
        f.write(f"== {title}\n{text.rstrip()}\n")


@dataclass
class Farm:
    """An embedded stack (`sdfarm stack up`) and the workers started on it, under one folder."""

    spec: Spec
    folder: Path
    env: dict[str, str]
    client: redis.Redis
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @classmethod
    def up(cls, spec: Spec, folder: Path, model_dir: Path, compile_on: bool) -> Farm:
        folder.mkdir(parents=True)
        family = ", family: sdxl" if spec.family == "sdxl" else ""
        (folder / "models.yaml").write_text(f"models:\n  {spec.family}: {{path: '{model_dir}'{family}}}\n")
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        env.update(SDFARM_MODELS_FILE=str(folder / "models.yaml"), SDFARM_CHUNK_SIZE=str(spec.chunk),
                   SDFARM_CACHE_DIR=str(folder / "cache"), SDFARM_COMPILE="1" if compile_on else "0",
                   HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        up = sdfarm(env, "stack", "up", "--dir", str(folder / "stack"), timeout=120)
        if up.returncode != 0:
            raise RuntimeError(f"stack up failed: {up.stdout[-2000:]}")
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = shlex.split(value)[0]
        return cls(spec, folder, env, redis.Redis.from_url(env["SDFARM_REDIS_URL"]))

    def start_worker(self, timeout: float) -> tuple[float, dict[str, float]]:
        """Seconds until the worker's heartbeat, and the load and compile times its log gives."""
        n = len(self.workers)
        host, log = f"bench-{n}@gpu-farm", self.folder / f"worker-{n}.log"
        t = time.time()
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "producer", "worker", "--model", self.spec.family,
                                     "--device", self.spec.device, "--hostname", host], env=self.env, cwd=ROOT,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append((proc, log))
        while not self.client.exists(worker_key(host)):
            if proc.poll() is not None or time.time() - t > timeout:
                raise RuntimeError(f"worker {n} did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        seconds = time.time() - t
        text = log.read_text(errors="replace")
        times = {}
        if m := re.search(r"compiled for \d+x\d+, batch \d+, in ([\d.]+)s", text):
            times["warm_up_compile_s"] = float(m.group(1))
        if m := re.search(r"loaded in ([\d.]+)s", text):
            times["load_model_s"] = float(m.group(1))
        return seconds, times

    def stop_workers(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            note(f"{log} (tail)", log.read_text(errors="replace")[-2500:])
        self.workers.clear()

    def submit(self, name: str, jobs: int, seed: int, budget: float) -> tuple[str, float, float]:
        """`sdfarm submit --watch` of a batch; its id, start and end (unix time). A farm that stops
        making progress (a worker failing every chunk) is given up on after SUBMIT_BASE_S plus
        SUBMIT_PER_JOB_S a job, not after the whole budget."""
        timeout = min(left(budget), SUBMIT_BASE_S + SUBMIT_PER_JOB_S * jobs)
        per_prompt = -(-jobs // len(PROMPTS))
        items = "".join(f"  - {{prompt: '{p}', count: {min(per_prompt, jobs - i * per_prompt)}}}\n"
                        for i, p in enumerate(PROMPTS) if jobs > i * per_prompt)
        s = self.spec
        path = self.folder / f"{name}.yaml"
        path.write_text(f"name: {name}\nseed: {seed}\ndefaults: {{model: {s.family}, width: {s.size}, height: {s.size},"
                        f" steps: {s.steps}, sampler: 'DPM++ 2M', guidance_scale: 7, negative_prompt: '{NEGATIVE}'}}\n"
                        f"items:\n{items}")
        start = time.time()
        result = sdfarm(self.env, "submit", str(path), "--watch", timeout=timeout)
        end = time.time()
        note(f"submit {name} (exit {result.returncode})", result.stdout[-3000:])
        found = re.search(r"batch ([0-9a-f]{20})", result.stdout)
        if result.returncode != 0 or found is None:
            raise RuntimeError(f"submit {name} failed (exit {result.returncode}): {result.stdout[-1500:]}")
        return found.group(1), start, end

    def fetch(self, batch_id: str, dest: Path) -> list[dict[str, Any]]:
        """The batch's PNGs and sidecars; the sidecars."""
        result = sdfarm(self.env, "fetch", batch_id, str(dest), timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"fetch failed: {result.stdout[-1500:]}")
        return [json.loads(p.read_text()) for p in sorted(dest.glob("*.json"))]

    def down(self) -> None:
        self.stop_workers()
        note("workers", sdfarm(self.env, "status", "--limit", "5", timeout=60).stdout)
        sdfarm(self.env, "stack", "down", "--dir", str(self.folder / "stack"), timeout=120)


def sidecar_figures(sidecars: list[dict[str, Any]]) -> dict[str, Any]:
    """From the sidecars: whether a compiled pipeline rendered, the render calls' own speed, encode time."""
    chunks = {(m["worker"]["hostname"], m["timings"]["render_started_at"]): m["timings"]["chunk_render_s"]
              for m in sidecars}
    render_s = sum(chunks.values())
    return {"compiled": sorted({m["worker"].get("compiled") for m in sidecars}, key=str),
            "devices": sorted({m["worker"]["device"] for m in sidecars}),
            "render_images_per_s": round(len(sidecars) / render_s, 3) if render_s else None,
            "encode_ms_per_image": round(1000 * float(np.mean([m["timings"]["encode_s"] for m in sidecars])), 1)}


def farm_phase(spec: Spec, label: str, compile_on: bool, jobs: int, model_dir: Path, work: Path, gpu: GpuSampler,
               budget: float) -> Path:
    """One worker on a fresh stack: cold start, a warm-up batch, the measured batch, and (compiled)
    a restart on the same cache. Returns the folder the measured batch was fetched into."""
    farm = Farm.up(spec, work / label, model_dir, compile_on)
    common = {"family": spec.family, "phase": label, "compile": compile_on, "chunk": spec.chunk}
    try:
        seconds, times = farm.start_worker(min(600, left(budget)))
        emit(stage="worker_up", start="cold", seconds=round(seconds, 1), **times, **common)
        _, start, end = farm.submit(f"first-{label}", 2 * spec.chunk, seed=1, budget=budget)
        emit(stage="first_chunks", images=2 * spec.chunk, seconds=round(end - start, 2), **common)
        batch_id, start, end = farm.submit("measured", jobs, seed=2026, budget=budget)
        fetched = work / f"{label}-images"
        sidecars = farm.fetch(batch_id, fetched)
        emit(stage="farm", images=jobs, workers=1, size=spec.size, steps=spec.steps, seconds=round(end - start, 2),
             images_per_s=round(jobs / (end - start), 3), **gpu.busy(start, end), **sidecar_figures(sidecars),
             **common)
        if compile_on and left(budget) > 60:
            farm.stop_workers()
            seconds, times = farm.start_worker(min(300, left(budget)))
            emit(stage="worker_up", start="warm", seconds=round(seconds, 1), **times, **common)
    finally:
        farm.down()
    return fetched


def compare(spec: Spec, compiled: Path, eager: Path) -> None:
    """The same jobs' PNGs from two farms: files `<index>-<job id>.png`, matched by job id."""
    by_id = {p.stem.split("-", 1)[1]: p for p in compiled.glob("*.png")}
    means, maxes = [], []
    for png in sorted(eager.glob("*.png")):
        other = by_id.get(png.stem.split("-", 1)[1])
        if other is not None:
            a = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
            b = np.asarray(Image.open(other).convert("RGB"), dtype=np.int16)
            means.append(float(np.abs(a - b).mean()))
            maxes.append(int(np.abs(a - b).max()))
    if not means:
        raise RuntimeError("no image in common between the two farms")
    emit(stage="compiled_vs_eager", family=spec.family, images=len(means), mean_levels=round(float(np.mean(means)), 3),
         worst_image_mean_levels=round(max(means), 3), max_levels=max(maxes),
         identical_images=sum(1 for m in maxes if m == 0))


def stage(spec: Spec, name: str, budget: float, run: Callable[[], Any]) -> Any:
    """run() if the budget leaves the stage the time it needs; its result, or None when it was
    skipped or failed (said in a figure: the stages after it still run)."""
    need = spec.needs.get(name, 0)
    if left(budget) < need:
        emit(stage=name, family=spec.family, skipped=f"{left(budget):.0f}s of the budget left, {need:.0f}s needed")
        return None
    try:
        return run()
    except Exception as e:  # keep going: every figure counts
        emit(stage=name, family=spec.family, error=f"{type(e).__name__}: {str(e)[-1500:]}")
        return None


def run_spec(spec: Spec, args: argparse.Namespace, work: Path, gpu: GpuSampler) -> None:
    """Model, bare loop, the farm compiled (on the CPU: unless --compile-on-cpu, eager twice) and eager."""
    model_dir = work / f"{spec.family}-model"
    stage(spec, "model", args.budget, partial(in_child, build_model, str(model_dir), spec.family, spec.tiny,
                                              timeout=left(args.budget)))
    if not (model_dir / "model_index.json").exists():
        return
    stage(spec, "baseline", args.budget, partial(in_child, bare_loop, str(model_dir), spec, timeout=left(args.budget)))
    compiled = not spec.tiny or args.compile_on_cpu
    fetched: dict[str, Path] = {}
    for label, on, jobs in (("compiled" if compiled else "eager-again", compiled, spec.jobs),
                            ("eager", False, spec.eager_jobs)):
        need = "eager" if label == "eager" else "compiled"
        if folder := stage(spec, need, args.budget, partial(farm_phase, spec, label, on, jobs, model_dir, work, gpu,
                                                            args.budget)):
            fetched[label] = folder
    if len(fetched) == 2:
        stage(spec, "compiled_vs_eager", args.budget, partial(compare, spec, *fetched.values()))
    shutil.rmtree(model_dir, ignore_errors=True)


def summary(figures: list[dict[str, Any]], tiny: bool) -> None:
    """The issue's targets against this run's figures (None: not measured in this run, or --tiny:
    the targets are for the real architectures on a GPU)."""

    def first(stage: str, **match: Any) -> dict[str, Any]:
        return next((f for f in figures if f.get("stage") == stage and all(f.get(k) == v for k, v in match.items())
                     and "error" not in f and "skipped" not in f), {})

    farm = first("farm", family="sd15", phase="compiled") or first("farm", family="sd15")
    loop8 = first("baseline", family="sd15", per_call=8)
    got: dict[str, Any] = {
        "sd15_images_per_s": farm.get("images_per_s"),
        "sdxl_images_per_s": (first("farm", family="sdxl", phase="compiled") or first("farm", family="sdxl")).get(
            "images_per_s"),
        "vs_baseline_batch8": round(farm["images_per_s"] / loop8["images_per_s"], 2) if farm and loop8 else None,
        "gpu_busy_pct": farm.get("gpu_busy_pct"),
        "warm_start_s": first("worker_up", family="sd15", start="warm").get("seconds"),
    }
    met = {k: None if v is None or tiny else (v <= TARGETS[k] if k == "warm_start_s" else v >= TARGETS[k])
           for k, v in got.items()}
    emit(stage="summary", measured=got, targets=TARGETS, met=met,
         cold_start_s=first("worker_up", family="sd15", start="cold", phase=farm.get("phase")).get("seconds"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU run: the project's tiny models, 64x64, 8 steps")
    ap.add_argument("--compile-on-cpu", action="store_true", help="with --tiny: the second farm compiled")
    ap.add_argument("--sdxl", action="store_true", help="SDXL 1024x1024 after SD1.5, if the budget allows")
    ap.add_argument("--jobs", type=int, default=0, help="jobs per measured batch (160; --tiny: 32)")
    ap.add_argument("--chunk", type=int, default=8, help="SDFARM_CHUNK_SIZE (a compiled worker's static batch)")
    ap.add_argument("--budget", type=float, default=300, help="seconds for the whole run; stages that would not"
                                                              " fit are skipped and say so")
    args = ap.parse_args()
    os.environ["GPU_FARM_T0"] = str(T0)
    os.environ.setdefault("OUT", tempfile.mkdtemp(prefix="gpu-farm-out-"))
    out().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-farm-"))
    results = out() / "results.jsonl"
    offset = results.stat().st_size if results.exists() else 0  # this run's figures follow
    versions = {d: metadata.version(d) for d in ("torch", "diffusers", "transformers", "celery")}
    emit(stage="env", tiny=args.tiny, gpu=gpu_name(), python=sys.version.split()[0], budget_s=args.budget, **versions)
    gpu = GpuSampler(out() / "gpu_util.csv", enabled=not args.tiny)
    try:
        for spec in specs(args):
            run_spec(spec, args, work, gpu)
    finally:
        gpu.stop()
        with results.open() as f:
            f.seek(offset)
            summary([json.loads(line) for line in f], args.tiny)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def gpu_name() -> str | None:
    """The GPU as nvidia-smi names it (no CUDA in this process)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False, timeout=30).stdout.strip()
    return out or None


if __name__ == "__main__":
    sys.exit(main())
