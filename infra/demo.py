"""`make demo`: the farm on the embedded stack, start to finish, on this machine's CPU.

Copies the toy SD 1.5 model trained here on a world of coloured shapes (shapes-sd15, with its LoRA,
embedding and CLIPSeg: worker/testing/trained/MODEL_CARD.md), writes tiny random-weight SD 1.5, SDXL
and SDXL-refiner models, starts a real Redis and a real S3 server, starts one worker per model,
submits examples/shapes.yaml (the trained model: prompts, weights, a negative prompt, a LoRA at 0, 0.5
and 1, an embedding, hires fix, and an inpaint of the background from a text mask) and
examples/features.yaml (every render feature on the random-weight models, SDXL and its refiner
included) through the real CLI, watches them finish, fetches the images and draws a contact sheet of
each, labelled with the prompts, and a showcase strip of the text-mask inpaint (the init image, the
mask CLIPSeg finds for "background", the result), then shuts everything down. State lives under
.sdfarm/demo/.

It also serves the HTTP API and the gallery (`sdfarm serve`, on port 8000 or the next free one) with a
token drawn for this run, and prints the gallery's address: the batches can be watched there as they
render. Run from a terminal, the demo then waits for Ctrl-C before it stops; otherwise it stops at
once. `--no-serve`: no API.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from infra.stack import EmbeddedStack, StackInfo

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".sdfarm" / "demo"
TRAINED = "shapes-sd15"  # the toy model trained on the shapes world
MODEL = "tiny-sd15"
XL_MODEL = "tiny-sdxl"
XL_REFINER = "tiny-xl-refiner"  # no worker of its own: the SDXL worker loads it for the jobs that name it
SHOWCASE_INIT = "red-circle.png"  # shapes.yaml's inpaint: its init image, under examples/inputs
BATCHES = [ROOT / "examples" / "shapes.yaml", ROOT / "examples" / "features.yaml"]
WORKERS = [TRAINED, MODEL, XL_MODEL]  # one process per entry, each serving that model
# the demo's assets (written by worker.testing), relative to STATE
ASSETS = {"tiny-detail": "loras/tiny-detail.safetensors", "tiny-grain": "loras/tiny-grain.safetensors",
          "tiny-sparkle": "embeddings/tiny-sparkle.safetensors", "tiny-clipseg": "mask_models/tiny-clipseg",
          "tiny-esrgan": "upscalers/tiny-esrgan.safetensors"}
TRAINED_ASSETS = {"outlined": "shapes/loras/outlined.safetensors",
                  "verdigris": "shapes/embeddings/verdigris.safetensors",
                  "shapes-clipseg": "shapes/mask_models/shapes-clipseg"}
XL_ASSETS = {"xl-detail": "sdxl/loras/xl-detail.safetensors", "xl-grain": "sdxl/loras/xl-grain.safetensors",
             "xl-sparkle": "sdxl/embeddings/xl-sparkle.safetensors", "xl-vae": "sdxl/vaes/xl-vae"}


def sdfarm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    print(f"$ sdfarm {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "producer", *args], env=env, cwd=ROOT, text=True, check=False,
                          stdout=subprocess.PIPE if args[0] == "submit" else None)


def write_files() -> Path:
    """The tiny models and their assets under STATE (kept from an earlier run), and the registry
    that names them; returns the registry's path."""
    STATE.mkdir(parents=True, exist_ok=True)
    for name, family in ((MODEL, "sd15"), (XL_MODEL, "sdxl"), (XL_REFINER, "sdxl-refiner")):
        model_dir = STATE / "models" / name
        if not (model_dir / "model_index.json").exists():
            from worker.testing import write_tiny_model

            print(f"writing a tiny random-weight {family}-architecture model to {model_dir}", flush=True)
            write_tiny_model(model_dir, family=family)
    from worker.testing.toy import write_trained_assets, write_trained_model

    print(f"copying the trained toy model {TRAINED} and its LoRA, embedding and CLIPSeg", flush=True)
    write_trained_model(STATE / "models" / TRAINED, replace=True)  # each run: the committed weights may be newer
    write_trained_assets(STATE / "shapes")
    if not all((STATE / path).exists() for path in [*ASSETS.values(), *XL_ASSETS.values()]):
        from worker.testing import write_tiny_assets, write_tiny_sdxl_assets

        print("writing tiny LoRAs, embeddings, a VAE and an upscaler that fit them", flush=True)
        write_tiny_assets(STATE)
        write_tiny_sdxl_assets(STATE / "sdxl")
    registry = STATE / "models.yaml"
    registry.write_text(f"models:\n  {TRAINED}: {{path: models/{TRAINED}}}\n  {MODEL}: {{path: models/{MODEL}}}\n"
                        f"  {XL_MODEL}: {{path: models/{XL_MODEL}, family: sdxl}}\n"
                        f"  {XL_REFINER}: {{path: models/{XL_REFINER}, family: sdxl-refiner}}\n"
                        f"loras:\n  outlined: {{file: {TRAINED_ASSETS['outlined']}}}\n"
                        f"  tiny-detail: {{file: {ASSETS['tiny-detail']}}}\n"
                        f"  tiny-grain: {{file: {ASSETS['tiny-grain']}}}\n"
                        f"  xl-detail: {{file: {XL_ASSETS['xl-detail']}, family: sdxl}}\n"
                        f"  xl-grain: {{file: {XL_ASSETS['xl-grain']}, family: sdxl}}\n"
                        f"embeddings:\n  verdigris: {{file: {TRAINED_ASSETS['verdigris']}}}\n"
                        f"  tiny-sparkle: {{file: {ASSETS['tiny-sparkle']}}}\n"
                        f"  xl-sparkle: {{file: {XL_ASSETS['xl-sparkle']}, family: sdxl}}\n"
                        f"vaes:\n  xl-vae: {{path: {XL_ASSETS['xl-vae']}, family: sdxl}}\n"
                        f"upscalers:\n  tiny-esrgan: {{file: {ASSETS['tiny-esrgan']}}}\n"
                        f"mask_models:\n  clipseg: {{path: {ASSETS['tiny-clipseg']}}}\n"
                        f"  shapes-clipseg: {{path: {TRAINED_ASSETS['shapes-clipseg']}}}\n")
    return registry


def start_workers(env: dict[str, str], logs: Path, workers: list[subprocess.Popen[bytes]]) -> None:
    """One worker process per WORKERS entry, appended to `workers` as each starts."""
    for n, model in enumerate(WORKERS):
        with (logs / f"worker-{n}.log").open("wb") as out:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "producer", "worker", "--model", model, "--device", "cpu",
                 "--hostname", f"demo-{n}@{os.uname().nodename}"],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))


def workers_ready(redis_url: str, workers: list[subprocess.Popen[bytes]]) -> bool:
    """Wait until every worker has registered its heartbeat; False as soon as one exits, or after 180 s."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 180
    print(f"starting {len(WORKERS)} workers ({', '.join(WORKERS)}; each loads its model once) ...", flush=True)
    while sum(1 for _ in client.scan_iter("sdfarm:worker:demo-*")) < len(WORKERS):
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def run_batches(env: dict[str, str], info: StackInfo, logs: Path) -> int:
    """Submit every batch, then watch each to the end, fetch its images and draw its contact sheet;
    the exit status of the first sdfarm command that failed, else 0."""
    batch_ids = []
    for batch in BATCHES:
        submitted = sdfarm("submit", str(batch), env=env)
        print(submitted.stdout, end="", flush=True)
        if submitted.returncode != 0:
            return submitted.returncode
        batch_ids.append(submitted.stdout.split()[1].rstrip(":"))
    summary = []
    for batch, batch_id in zip(BATCHES, batch_ids, strict=True):
        watched = sdfarm("watch", batch_id, "--timeout", "600", env=env)
        if watched.returncode != 0:
            return watched.returncode
        fetched = STATE / "output" / batch.stem
        sheet = STATE / f"contact_sheet_{batch.stem}.png"
        sdfarm("fetch", batch_id, str(fetched), "--contact-sheet", str(sheet), env=env)
        summary.append(f"  {batch.name}: batch {batch_id}\n    fetched to:     {fetched}\n"
                       f"    contact sheet:  {sheet}")
        if batch.stem == "shapes" and (strip := draw_showcase(fetched, STATE / "showcase_inpaint.png")) is not None:
            summary.append(f"    inpaint showcase: {strip}  (init image | mask from text | result)")
    sdfarm("status", "--limit", "5", env=env)
    print("\nDone.\n" + "\n".join(summary) + "\n"
          f"  in S3:            s3://{info.bucket}/renders/<job_id>.png and .json"
          f" (manifests under s3://{info.bucket}/batches/)\n"
          f"  worker logs:      {logs}", flush=True)
    return 0


def draw_showcase(fetched: Path, out: Path) -> Path | None:
    """The batch's text-mask inpaint side by side: its init image (SHOWCASE_INIT), the mask its CLIPSeg
    model finds for its mask_prompt (before A1111's blur), and the render. None when the fetched batch
    has no finished text-mask inpaint, or its files cannot be read."""
    import torch
    from PIL import Image, ImageDraw, ImageOps

    from worker.masks import MaskModels

    try:
        rows = [json.loads(line) for line in (fetched / "manifest.jsonl").read_text().splitlines()]
        done = [(row, json.loads((fetched / row["sidecar"]).read_text())["job"]) for row in rows
                if row["status"] == "done"]
    except (OSError, ValueError, KeyError):
        return None
    for row, job in done:
        if not job.get("mask_prompt") or not job.get("mask_model"):
            continue
        init = Image.open(ROOT / "examples" / "inputs" / SHOWCASE_INIT).convert("RGB")
        folder = STATE / TRAINED_ASSETS[job["mask_model"]["name"]]
        mask = MaskModels(torch.device("cpu")).text_mask(folder, init, job["mask_prompt"], job["mask_threshold"])
        tiles = [(init, ["init image"]), (mask.convert("RGB"), [f"mask: \"{job['mask_prompt']}\""]),
                 (Image.open(fetched / row["image"]).convert("RGB"), ["inpainted:", job["prompt"]])]
        sheet = Image.new("RGB", (3 * 192, 192 + 30), "white")
        draw = ImageDraw.Draw(sheet)
        for n, (tile, label) in enumerate(tiles):
            sheet.paste(ImageOps.contain(tile, (192, 192), Image.Resampling.NEAREST), (n * 192, 0))
            for k, text in enumerate(label):
                draw.text((n * 192 + 4, 195 + 12 * k), text, fill=(24, 24, 24))
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
        return out
    return None


def start_api(env: dict[str, str], logs: Path, processes: list[subprocess.Popen[bytes]]) -> str | None:
    """`sdfarm serve` on port 8000 (or the next free one); the gallery's address once it answers."""
    port = next(p for p in range(8000, 8100) if _port_free(p))
    with (logs / "api.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "producer", "serve", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return url
        except OSError:
            time.sleep(0.2)
    return None


def show_api(url: str, token: str) -> None:
    """The same batches through the HTTP API: what a web app or a notebook would read."""
    request = urllib.request.Request(url + "/v1/batches?limit=5", headers={"Authorization": f"Bearer {token}"})
    print(f"$ curl -H 'Authorization: Bearer {token}' {url}/v1/batches?limit=5", flush=True)
    with urllib.request.urlopen(request, timeout=10) as response:
        for batch in json.load(response)["batches"]:
            print(f"  {batch['batch_id']}  {batch['name']:<10} {batch['status']:<8} {batch['done']}/{batch['total']}"
                  " done", flush=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop(workers: list[subprocess.Popen[bytes]], stack: EmbeddedStack) -> None:
    """SIGTERM every worker (SIGKILL after 30 s), then stop the stack."""
    for w in workers:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
    stack.stop()
    print("workers and stack stopped", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="the farm on the embedded stack, start to finish")
    ap.add_argument("--no-serve", action="store_true", help="do not start the HTTP API and gallery")
    args = ap.parse_args()
    registry = write_files()
    stack = EmbeddedStack(STATE / "stack")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        print("starting the embedded stack (Redis + SeaweedFS S3) ...", flush=True)
        info = stack.start()
        env = {**os.environ, **info.env(), "SDFARM_MODELS_FILE": str(registry), "SDFARM_CHUNK_SIZE": "4",
               "SDFARM_CPU_THREADS": str(max(1, (os.cpu_count() or 1) // len(WORKERS))),
               "SDFARM_INPUTS_DIR": str(ROOT / "examples" / "inputs"),
               "SDFARM_API_TOKENS": f"demo:{secrets.token_urlsafe(18)}", "HF_HUB_OFFLINE": "1"}
        print(f"  redis   127.0.0.1:{info.redis_port} (password, AOF)\n  s3      {info.s3_endpoint}"
              f"  bucket {info.bucket}", flush=True)

        logs = STATE / "logs"
        logs.mkdir(exist_ok=True)
        gallery = None if args.no_serve else start_api(env, logs, workers)
        if gallery is not None:
            token = env["SDFARM_API_TOKENS"].partition(":")[2]
            print(f"  gallery {gallery}/  (log in with the token {token}; the API's docs: {gallery}/docs)",
                  flush=True)
        elif not args.no_serve:
            print(f"the API did not start: see {logs / 'api.log'}", file=sys.stderr)
        start_workers(env, logs, workers)
        if not workers_ready(info.redis_url, workers):
            print(f"a worker did not start: see {logs}", file=sys.stderr)
            return 1
        code = run_batches(env, info, logs)
        if gallery is not None and code == 0:
            show_api(gallery, env["SDFARM_API_TOKENS"].partition(":")[2])
        if gallery is not None and code == 0 and sys.stdin.isatty():
            print(f"\nThe gallery stays up at {gallery}/ until you press Ctrl-C.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return code
    finally:
        stop(workers, stack)


if __name__ == "__main__":
    sys.exit(main())
