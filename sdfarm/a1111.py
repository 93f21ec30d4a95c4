"""A1111 images in: the `parameters` text that A1111 (or sdfarm) wrote into PNGs, read back as batch
items, one job per image, with its own seed. `sdfarm submit` takes one such PNG, a folder of them, or
a .txt of infotexts (as PNG Info shows them, one after another).

A field sdfarm cannot render as A1111 did is refused, naming the image and the field; nothing is
dropped silently. `Version` is ignored (who rendered, not how). Hashes are checked: `Model hash`
picks the registered model, `VAE hash` the registered VAE, `TI hashes` and (for LoRAs in local
files) `Lora hashes` must be the registered files'. A1111 draws noise on the GPU unless the infotext
says `RNG: CPU`; sdfarm draws it on the CPU, so such images are refused unless the caller accepts CPU
noise (same settings and seeds, other noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from PIL import Image, UnidentifiedImageError

from .errors import BatchInvalid, InvalidInput, Problem, brief
from .infotext import is_parameters_line, parse_infotext
from .inputs import open_regular, read_regular
from .models import AssetKind, Registry, a1111_lora_hash
from .samplers import BETA_ALPHA, BETA_BETA

MAX_PNG_BYTES: Final = 64 * 1024 * 1024
MAX_INFOTEXT_BYTES: Final = 64 * 1024 * 1024  # a .txt of infotexts, read whole
IGNORED: Final = frozenset({"Version", "User"})
_SCALARS: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule_type", str),
    "CFG scale": ("guidance_scale", float), "Seed": ("seed", int), "Size-1": ("width", int),
    "Size-2": ("height", int), "Clip skip": ("clip_skip", int), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float)}
_HIRES: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "Hires upscale": ("scale", float), "Hires steps": ("steps", int), "Hires upscaler": ("upscaler", str),
    "Denoising strength": ("denoising_strength", float), "Hires sampler": ("sampler", str),
    "Hires schedule type": ("schedule_type", str), "Hires CFG Scale": ("guidance_scale", float),
    "Hires prompt": ("prompt", str), "Hires negative prompt": ("negative_prompt", str)}
_UPSCALE: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "Postprocess upscale by": ("factor", float), "Postprocess upscaler": ("upscaler", str)}
# the Beta schedule's distribution: sdfarm runs A1111's default
BETA_FIELDS: Final = {"Beta schedule alpha": BETA_ALPHA, "Beta schedule beta": BETA_BETA}
# A1111's refiner options away from their defaults, which sdfarm runs
_REFINER_OPTIONS: Final = {
    "Hires refiner": "sdfarm's refiner takes over in the hires pass only (A1111's default, 'second pass')",
    "Refiner switch by sampling steps": "sdfarm switches at the sampler's sigma (A1111's default), not by steps"}
_OTHER_FIELDS: Final = {"Model": "model", "Model hash": "model", "VAE": "vae", "VAE hash": "vae",
                        "Refiner": "refiner", "Refiner switch at": "refiner_switch_at",
                        "Seed resize from-1": "seed_resize_from", "Seed resize from-2": "seed_resize_from",
                        "Hires resize-1": "hires.resize_x", "Hires resize-2": "hires.resize_y",
                        "Postprocess upscale by": "upscale.factor", "Postprocess upscaler": "upscale.upscaler"}
_HANDLED: Final = frozenset({"Prompt", "Negative prompt", "Model", "Model hash", "VAE", "VAE hash", "RNG",
                             "Refiner", "Refiner switch at", *_REFINER_OPTIONS,
                             "Lora hashes", "TI hashes", "Emphasis", "Seed resize from-1", "Seed resize from-2",
                             "Hires resize-1", "Hires resize-2", *BETA_FIELDS,
                             *_SCALARS, *_HIRES, *_UPSCALE, *IGNORED})


def png_paths(path: Path) -> list[Path]:
    """The PNGs a submit of `path` reads: the file itself, or a folder's *.png in name order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
    return [path]


def read_images(path: Path, registry: Registry, max_jobs: int, cpu_noise: bool) -> list[dict[str, Any]]:
    """One batch item per PNG under `path`. Raises BatchInvalid naming each image and field that
    cannot be read or rendered as A1111 did."""
    source = str(path)
    pngs = png_paths(path)
    if not pngs:
        raise BatchInvalid([Problem(source, None, None, "", "holds no .png files")])
    _check_count(source, len(pngs), "PNGs", max_jobs)
    texts: list[tuple[Problem, str | InvalidInput]] = []
    for png in pngs:
        try:
            texts.append((Problem(str(png), None, None, "", ""), _parameters(png)))
        except InvalidInput as e:
            texts.append((Problem(str(png), None, None, "", ""), e))
    return _items(texts, Registered(registry), cpu_noise)


def read_infotexts(path: Path, registry: Registry, max_jobs: int, cpu_noise: bool) -> list[dict[str, Any]]:
    """One batch item per infotext in a .txt of them (as A1111's PNG Info shows them, one after
    another; each ends at its `Steps: ...` line). Raises BatchInvalid naming each infotext's line and
    field that cannot be read or rendered as A1111 did."""
    source = str(path)
    try:
        text = read_regular(path, MAX_INFOTEXT_BYTES).decode("utf-8-sig")
    except InvalidInput as e:
        raise BatchInvalid([Problem(source, None, None, "", f"file {e}")]) from None
    except UnicodeDecodeError as e:
        raise BatchInvalid([Problem(source, None, None, "", f"is not UTF-8 text (byte {e.start})")]) from None
    found = split_infotexts(text)
    if not found:
        raise BatchInvalid([Problem(source, None, None, "", "holds no infotexts (each ends with its `Steps: ...`"
                                                            " line)")])
    _check_count(source, len(found), "infotexts", max_jobs)
    texts: list[tuple[Problem, str | InvalidInput]] = [
        (Problem(source, line, n, "", ""), body if complete else InvalidInput(
            "an infotext without its parameters line (`Steps: ...`) at the end of the file"))
        for n, (line, body, complete) in enumerate(found, 1)]
    return _items(texts, Registered(registry), cpu_noise)


def split_infotexts(text: str) -> list[tuple[int, str, bool]]:
    """(first line, text, whether it ended with its parameters line) of each infotext in a text:
    each runs to its parameters line; blank lines between them are skipped."""
    found: list[tuple[int, str, bool]] = []
    lines: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not lines and not line.strip():
            continue
        if not lines:
            start = number
        lines.append(line)
        if is_parameters_line(line):
            found.append((start, "\n".join(lines), True))
            lines = []
    if lines:
        found.append((start, "\n".join(lines), False))
    return found


def looks_like_infotexts(head: str) -> bool:
    """Whether the start of a .txt holds infotexts rather than one prompt a line."""
    return any(is_parameters_line(line) for line in head.splitlines())


def _check_count(source: str, count: int, what: str, max_jobs: int) -> None:
    if count > max_jobs:
        raise BatchInvalid([Problem(source, None, None, "", f"holds {count} {what} (allowed: at most {max_jobs};"
                                                            " the cap is SDFARM_MAX_JOBS_PER_BATCH)")])


def _items(texts: list[tuple[Problem, str | InvalidInput]], known: Registered, cpu_noise: bool
           ) -> list[dict[str, Any]]:
    """An item per infotext; every problem named by where its infotext is (`at`) and the field."""
    items, problems = [], []
    for at, text in texts:
        if isinstance(text, InvalidInput):
            problems.append(replace(at, message=str(text)))
            continue
        try:
            items.append(item_from_infotext(text, known, cpu_noise))
        except _Refused as e:
            problems.extend(replace(at, field=fld, message=message) for fld, message in e.problems)
    if problems:
        raise BatchInvalid(problems)
    return items


def _parameters(png: Path) -> str:
    """The image's `parameters` text (Pillow bounds the size of text chunks it reads)."""
    with open_regular(png, MAX_PNG_BYTES) as f:
        try:
            with Image.open(f, formats=["PNG"]) as image:
                text = getattr(image, "text", {}).get("parameters")
        except UnidentifiedImageError:
            raise InvalidInput("is not a PNG image") from None
        except (OSError, ValueError, SyntaxError) as e:  # a damaged PNG, a text chunk over Pillow's bounds
            raise InvalidInput(f"is not a readable PNG: {type(e).__name__}: {brief(str(e), 200)}") from None
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("holds no A1111 `parameters` text (an image A1111 or sdfarm saved, with its infotext)")
    return text


class Registered:
    """What the infotexts are checked against, read from the registry once per submit however many
    images there are: models by short hash and name, VAEs and embeddings by identity, LoRAs'
    A1111 hashes (files are hashed once each)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.model_names = registry.names()
        self.models = [(n, registry.identity(n)[:10], registry.get(n).infotext_name) for n in self.model_names]
        self._identities: dict[tuple[str, str], str] = {}
        self._lora_hashes: dict[str, str | None] = {}

    def identity(self, kind: AssetKind, name: str) -> str:
        if (kind, name) not in self._identities:
            self._identities[kind, name] = self.registry.asset_identity(kind, name)
        return self._identities[kind, name]

    def lora_hash(self, name: str) -> str | None:
        """A1111's short hash of a LoRA in a local file; None for one in the bucket (not fetched here)."""
        if name not in self._lora_hashes:
            file = self.registry.asset("lora", name).file
            self._lora_hashes[name] = a1111_lora_hash(file) if file is not None else None
        return self._lora_hashes[name]


class _Refused(Exception):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


def item_from_infotext(text: str, known: Registered, cpu_noise: bool = False) -> dict[str, Any]:
    """A batch item that renders what the infotext describes. Raises _Refused with (field, why) for
    each field sdfarm cannot honour."""
    item, problems = item_from_parameters(parse_infotext(text), known, cpu_noise)
    if problems:
        raise _Refused(problems)
    return item


def job_field(key: str) -> str | None:
    """The job field that an infotext key sets ("Steps": steps, "Hires upscale": hires.scale); None
    for a key that sets no field of its own (Version, RNG, hashes)."""
    if key in _SCALARS:
        return _SCALARS[key][0]
    if key in _HIRES:
        return "hires." + _HIRES[key][0]
    return _OTHER_FIELDS.get(key)


def item_from_parameters(info: dict[str, Any], known: Registered, cpu_noise: bool = False
                         ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The batch item that renders what an infotext's parameters describe (keyed as parse_infotext
    gives them: Prompt, Negative prompt, Steps, Size-1, ...; a value a string, as read, or a number),
    and (key, why) for each key sdfarm cannot honour. A1111's API requests come here too, their
    fields named by the infotext keys A1111 records them under."""
    problems: list[tuple[str, str]] = []
    item: dict[str, Any] = {"prompt": info["Prompt"], "negative_prompt": info["Negative prompt"]}
    for key, (fld, kind) in _SCALARS.items():
        if key in info:
            item[fld] = _value(info, key, kind, problems)
    if "Seed resize from-1" in info:
        item["seed_resize_from"] = [_value(info, f"Seed resize from-{i}", int, problems) for i in (1, 2)]
    hires = {fld: _value(info, key, kind, problems) for key, (fld, kind) in _HIRES.items() if key in info}
    if "Hires resize-1" in info:
        hires.update(resize_x=_value(info, "Hires resize-1", int, problems),
                     resize_y=_value(info, "Hires resize-2", int, problems))
    if "Hires upscale" in info or "Hires resize-1" in info:
        item["hires"] = hires
    else:
        problems.extend((key, "a hires field without `Hires upscale` or `Hires resize`") for key in info
                        if key in _HIRES and key != "Denoising strength")
    if "Denoising strength" in info and "hires" not in item:
        problems.append(("Denoising strength", "an img2img or inpainting image (no hires fields): its init image is"
                                               " not in the infotext; submit it as a batch item with init_image"))
    upscale = {fld: _value(info, key, kind, problems) for key, (fld, kind) in _UPSCALE.items() if key in info}
    if upscale:
        item["upscale"] = upscale
    for key, message in _checks(info, known, item, cpu_noise):
        problems.append((key, message))
    problems.extend((key, f"{brief(info[key])}: sdfarm cannot render this as A1111 did (not supported)")
                    for key in info if key not in _HANDLED)
    return item, problems


def _value(info: dict[str, Any], key: str, kind: Callable[[str], Any], problems: list[tuple[str, str]]) -> Any:
    try:
        return kind(info[key])
    except ValueError:
        problems.append((key, f"{brief(info[key])} is not a {'number' if kind is not str else 'text'}"))
        return None


def _checks(info: dict[str, Any], known: Registered, item: dict[str, Any], cpu_noise: bool
            ) -> Iterator[tuple[str, str]]:
    rng = info.get("RNG", "GPU")
    if rng != "CPU" and not cpu_noise:
        said = f"RNG: {rng}" if "RNG" in info else "no RNG field, which A1111 reads as GPU"
        yield "RNG", (f"{said}: sdfarm draws each image's noise on the CPU (A1111's RNG: CPU); pass"
                      " --cpu-noise to render it with CPU noise (same settings and seed, other noise)")
    for key, default in BETA_FIELDS.items():
        if key in info and _float_or_none(info[key]) != default:
            yield key, (f"{brief(info[key])}: sdfarm runs the Beta schedule at A1111's default"
                        f" {key.rsplit(' ', 1)[1]} {default:g}")
    if info.get("Emphasis", "Original") != "Original":
        yield "Emphasis", f"{brief(info['Emphasis'])}: sdfarm weights prompts as A1111's Original"
    model = _model(info, known)
    if isinstance(model, str):
        item["model"] = model
    else:
        yield model
    yield from _refiner_fields(info, known, item)
    if "VAE" in info or "VAE hash" in info:
        vae = _vae(known, info.get("VAE hash"), info.get("VAE"))
        if vae is None:
            yield "VAE", f"{brief(info.get('VAE'))} [{info.get('VAE hash', '?')}] is no registered VAE"
        else:
            item["vae"] = vae
    yield from _check_hashes(info, known)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _model(info: dict[str, Any], known: Registered) -> str | tuple[str, str]:
    """The registered model the image names: by `Model hash` (sha256[:10]) when given, else by
    `Model` (registry name, or the checkpoint file's stem)."""
    wanted_hash, wanted_name = info.get("Model hash"), info.get("Model")
    names = known.model_names
    named = [n for n, _, stem in known.models if wanted_name in (n, stem)]
    if wanted_hash:
        hashed = [n for n, short, _ in known.models if short == wanted_hash]
        if hashed:
            return next((n for n in hashed if n in named), hashed[0])
        return "Model hash", (f"{brief(wanted_hash)} ({brief(wanted_name)}) is no registered model's"
                              f" (registered: {', '.join(names) or 'none'})")
    if named:
        return named[0]
    return "Model", f"{brief(wanted_name)} is no registered model (registered: {', '.join(names) or 'none'})"


def _refiner_fields(info: dict[str, Any], known: Registered, item: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if "Refiner" in info:
        refiner = _refiner(info["Refiner"], known)
        if refiner is None:
            yield "Refiner", (f"{brief(info['Refiner'])} is no registered model"
                              f" (registered: {', '.join(known.model_names) or 'none'})")
        else:
            item["refiner"] = refiner
    if "Refiner switch at" in info and "Refiner" not in info:
        yield "Refiner switch at", "without `Refiner` (the model that takes over)"
    elif "Refiner switch at" in info:
        switch_at = _float_or_none(info["Refiner switch at"])
        item["refiner_switch_at"] = info["Refiner switch at"] if switch_at is None else switch_at
    for key, why in _REFINER_OPTIONS.items():
        if key in info:
            yield key, f"{brief(info[key])}: {why}"


def _refiner(value: str, known: Registered) -> str | None:
    """The registered model A1111's `Refiner: name [short hash]` names: by the hash when given, else by
    the name (registry name, or checkpoint file stem)."""
    name, bracket, short = value.rpartition(" [")
    if not bracket or not short.endswith("]"):
        name, short = value, ""
    short, name = short.removesuffix("]"), name.strip()
    named = [n for n, _, stem in known.models if name in (n, stem)]
    if short:  # the hash decides; the name picks among models that share it, as for `Model`
        hashed = [n for n, held, _ in known.models if held == short]
        return next((n for n in hashed if n in named), hashed[0] if hashed else None)
    return named[0] if named else None


def _vae(known: Registered, short: str | None, name: str | None) -> str | None:
    """The registered VAE by `VAE hash` (sha256[:10]) when given, else by `VAE` (registry or file name)."""
    for n in known.registry.asset_names("vae"):
        if short and known.identity("vae", n)[:10] == short:
            return n
        if not short and name in (n, known.registry.asset("vae", n).file_name):
            return n
    return None


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = [part.rsplit(":", 1) for part in text.split(",") if part.strip()]
    return [(p[0].strip(), p[1].strip()) if len(p) == 2 else (p[0].strip(), "") for p in pairs]


def _check_hashes(info: dict[str, Any], known: Registered) -> Iterator[tuple[str, str]]:
    for name, short in _pairs(info.get("TI hashes", "")):
        if name not in known.registry.asset_names("embedding"):
            yield "TI hashes", f"embedding {brief(name)} is not registered"
        elif known.identity("embedding", name)[:len(short) or 12] != short:
            yield "TI hashes", f"embedding {brief(name)}: the image's {brief(short)} is not the registered file's"
    for name, short in _pairs(info.get("Lora hashes", "")):
        if name not in known.registry.asset_names("lora"):
            yield "Lora hashes", f"lora {brief(name)} is not registered"
        elif (held := known.lora_hash(name)) is not None and held != short:
            yield "Lora hashes", f"lora {brief(name)}: the image's {brief(short)} is not the registered file's"
