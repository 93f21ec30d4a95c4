"""Batch files in, validated RenderJobs out: all or nothing.

Formats, chosen by suffix:
- .yaml/.yml/.json: {name, seed, defaults, matrix, items}; an item is a mapping or a bare prompt
- .jsonl: one item (a JSON object) per line
- .csv: a header of field names, one item per row (empty cell = not set)
- .txt: one prompt per line; blank lines and lines starting with # are skipped

Every item may set any job field (sdfarm.jobs.USER_FIELDS) plus:
- count: N images with N seeds; seeds: [s1, s2, ...] explicit seeds
- matrix: {field: [values...]} expanded as a cartesian product (YAML/JSON; also top level)
Seeds not given are derived from the batch seed and the item's position, and always recorded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from .errors import BatchInvalid, InvalidInput, Problem
from .extra_networks import lora_tags
from .inputs import Inputs
from .jobs import DEFAULT_MASK_MODEL, HIRES_UPSCALERS, IMAGE_UPSCALERS, MAX_SEED, USER_FIELDS, RenderJob, parse_loras
from .models import Registry

ITEM_KEYS: Final = (*USER_FIELDS, "count", "seeds", "matrix")
TOP_KEYS: Final = ("name", "seed", "defaults", "matrix", "items")
FORMATS: Final = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "txt"}
MAX_COUNT: Final = 10_000
MAX_FILE_BYTES: Final = 64 * 1024 * 1024


@dataclass
class RawItem:
    data: dict[str, Any]
    item: int  # 1-based
    line: int | None = None
    key_lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchPlan:
    """A validated batch: its jobs in order, and the normalised spec recorded in S3."""

    batch_id: str
    name: str
    seed: int
    jobs: tuple[RenderJob, ...]
    spec: dict[str, Any]
    uploads: dict[str, bytes] = field(default_factory=dict)  # local input images: key -> bytes


# ---------------------------------------------------------------- YAML with line numbers


class _LineDict(dict[str, Any]):
    line: int
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        result[str(key) if not isinstance(key, str) else key] = loader.construct_object(
            value_node, deep=True  # type: ignore[no-untyped-call]
        )
        result.key_lines[str(key)] = key_node.start_mark.line + 1
    return result


class _LineList(list[Any]):
    item_lines: list[int]


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)  # type: ignore[no-untyped-call]
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _yaml_problem(source: str, e: yaml.YAMLError) -> Problem:
    mark = getattr(e, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    column = f", column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e)
    return Problem(source, line, None, "", f"malformed YAML{column}: {what}")


# ---------------------------------------------------------------- reading each format


def _read_structured(text: str, source: str, fmt: str) -> tuple[dict[str, Any], list[RawItem]]:
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BatchInvalid(
                [Problem(source, e.lineno, None, "", f"malformed JSON, column {e.colno}: {e.msg}")]
            ) from e
        try:  # same data again, with line numbers (JSON is YAML); fall back to none
            with_lines = yaml.load(text, Loader=_LineLoader)
            if with_lines == data:
                data = with_lines
        except yaml.YAMLError:
            pass
    else:
        try:
            data = yaml.load(text, Loader=_LineLoader)
        except yaml.YAMLError as e:
            raise BatchInvalid([_yaml_problem(source, e)]) from e
    if isinstance(data, list):
        data = {"items": data}
    if not isinstance(data, dict):
        raise BatchInvalid([Problem(source, None, None, "", "expected a mapping with 'items' or a list of items")])
    problems = [
        Problem(source, _key_line(data, k), None, str(k), f"unknown top-level key (allowed: {', '.join(TOP_KEYS)})")
        for k in data
        if k not in TOP_KEYS
    ]
    items_data = data.get("items")
    if not isinstance(items_data, list) or not items_data:
        problems.append(Problem(source, _key_line(data, "items"), None, "items", "expected a non-empty list of items"))
    for key in ("defaults", "matrix"):
        if key in data and not isinstance(data[key], dict):
            problems.append(Problem(source, _key_line(data, key), None, key, "expected a mapping"))
    if problems or not isinstance(items_data, list):
        raise BatchInvalid(problems)
    items: list[RawItem] = []
    item_lines = getattr(items_data, "item_lines", [])
    for n, raw in enumerate(items_data, start=1):
        line = item_lines[n - 1] if n <= len(item_lines) else None
        if isinstance(raw, str):
            items.append(RawItem({"prompt": raw}, n, line))
        elif isinstance(raw, dict):
            items.append(RawItem(dict(raw), n, line, dict(getattr(raw, "key_lines", {}))))
        else:
            problems.append(Problem(source, line, n, "", f"expected a mapping or a prompt string, got {raw!r}"))
    if problems:
        raise BatchInvalid(problems)
    header = {k: data[k] for k in ("name", "seed", "defaults", "matrix") if k in data}
    return header, items


def _key_line(data: Mapping[str, Any], key: str) -> int | None:
    lines = getattr(data, "key_lines", {})
    return lines.get(key, getattr(data, "line", None))


def _read_jsonl(text: str, source: str) -> list[RawItem]:
    items: list[RawItem] = []
    problems: list[Problem] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n = len(items) + len(problems) + 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(source, lineno, n, "", f"malformed JSON, column {e.colno}: {e.msg}"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(source, lineno, n, "", "expected a JSON object"))
            continue
        items.append(RawItem(obj, n, lineno))
    if problems:
        raise BatchInvalid(problems)
    return items


def _read_csv(text: str, source: str) -> list[RawItem]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    items: list[RawItem] = []
    problems: list[Problem] = []
    try:
        header = next(reader, None)
        if not header:
            raise BatchInvalid([Problem(source, 1, None, "", "empty CSV: expected a header of field names")])
        header = [h.strip() for h in header]
        for col in header:
            if col not in (*USER_FIELDS, "count"):
                allowed = ", ".join((*USER_FIELDS, "count"))
                problems.append(Problem(source, 1, None, col, f"unknown column (allowed: {allowed})"))
        if problems:
            raise BatchInvalid(problems)
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            n = len(items) + len(problems) + 1
            if len(row) != len(header):
                problems.append(Problem(source, lineno, n, "", f"expected {len(header)} cells, got {len(row)}"))
                continue
            items.append(RawItem({k: v for k, v in zip(header, row, strict=True) if v != ""}, n, lineno))
    except csv.Error as e:
        problems.append(Problem(source, reader.line_num, None, "", f"malformed CSV: {e}"))
    if problems:
        raise BatchInvalid(problems)
    return items


def _read_txt(text: str) -> list[RawItem]:
    items: list[RawItem] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            items.append(RawItem({"prompt": prompt}, len(items) + 1, lineno))
    return items


def read_batch(text: str, source: str, fmt: str) -> tuple[dict[str, Any], list[RawItem]]:
    """Parse one batch file's text into (header, items). Raises BatchInvalid on syntax errors."""
    if fmt in ("yaml", "json"):
        return _read_structured(text, source, fmt)
    if fmt == "jsonl":
        return {}, _read_jsonl(text, source)
    if fmt == "csv":
        return {}, _read_csv(text, source)
    if fmt == "txt":
        return {}, _read_txt(text)
    raise InvalidInput(f"{source}: unknown batch format {fmt!r} (allowed: {', '.join(sorted(set(FORMATS.values())))})")


# ---------------------------------------------------------------- expansion and validation


def derive_seed(batch_seed: int, item: int, k: int) -> int:
    """The seed of the k-th image of item (0-based positions) when none is given."""
    digest = hashlib.sha256(f"sdfarm-seed:{batch_seed}:{item}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class _Planner:
    def __init__(self, source: str, registry: Registry, max_jobs: int, inputs: Inputs | None) -> None:
        self.source = source
        self.registry = registry
        self.max_jobs = max_jobs
        self.inputs = inputs or Inputs(None, None)
        self.problems: list[Problem] = []
        self._seen: set[tuple[int, str, str]] = set()

    def problem(self, raw: RawItem | None, fld: str, message: str) -> None:
        item = raw.item if raw else None
        key = (item or 0, fld, message)
        if key in self._seen:
            return
        self._seen.add(key)
        line = (raw.key_lines.get(fld.split(".")[0], raw.line) if raw else None) or (raw.line if raw else None)
        self.problems.append(Problem(self.source, line, item, fld, message))

    def check_matrix(self, raw: RawItem | None, matrix: Any, where: str) -> dict[str, list[Any]]:
        if not isinstance(matrix, dict):
            self.problem(raw, where, f"expected a mapping of field to list of values, got {matrix!r}")
            return {}
        good: dict[str, list[Any]] = {}
        for key, values in matrix.items():
            if key not in USER_FIELDS:
                self.problem(raw, f"{where}.{key}", f"unknown field (allowed: {', '.join(USER_FIELDS)})")
            elif not isinstance(values, list) or not values:
                self.problem(raw, f"{where}.{key}", f"expected a non-empty list of values, got {values!r}")
            else:
                good[key] = values
        return good

    def seeds_of(self, raw: RawItem, values: dict[str, Any], batch_seed: int) -> list[int] | None:
        count, seeds = values.get("count"), values.get("seeds")
        if count is not None and seeds is not None:
            self.problem(raw, "seeds", "set either count or seeds, not both")
            return None
        if seeds is not None:
            if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds
            ):
                self.problem(raw, "seeds", f"expected a non-empty list of integers 0..{MAX_SEED}, got {seeds!r}")
                return None
            return list(seeds)
        n = 1
        if count is not None:
            try:
                n = int(count)
            except (TypeError, ValueError):
                n = -1
            if isinstance(count, bool) or not 1 <= n <= MAX_COUNT:
                self.problem(raw, "count", f"{count!r} is not allowed (allowed: an integer 1..{MAX_COUNT})")
                return None
        if "seed" in values:  # A1111's batch convention: seed, seed+1, ...
            try:
                first = int(values["seed"])
            except (TypeError, ValueError):
                return [values["seed"]] * n  # the job model reports the bad value
            return [first + k for k in range(n)]
        return [derive_seed(batch_seed, raw.item - 1, k) for k in range(n)]

    def expand(self, raw: RawItem, defaults: dict[str, Any], top_matrix: dict[str, list[Any]], batch_seed: int
               ) -> Iterator[dict[str, Any]]:
        for key in raw.data:
            if key not in ITEM_KEYS:
                self.problem(raw, str(key), f"unknown field (allowed: {', '.join(ITEM_KEYS)})")
        values = {**defaults, **{k: v for k, v in raw.data.items() if k != "matrix"}}
        matrix = dict(top_matrix)
        if "matrix" in raw.data:
            matrix.update(self.check_matrix(raw, raw.data["matrix"], "matrix"))
        seeds = self.seeds_of(raw, values, batch_seed)
        if seeds is None:
            return
        keys = list(matrix)
        for combo in itertools.product(*(matrix[k] for k in keys)):
            base = {k: v for k, v in values.items() if k in USER_FIELDS and k != "seed"}
            base.update(zip(keys, combo, strict=True))
            if "seed" in base:  # the matrix swept the seed itself
                yield base
                continue
            for seed in seeds:
                yield {**base, "seed": seed}

    def job(self, raw: RawItem, values: dict[str, Any]) -> RenderJob | None:
        model = values.get("model")
        model_hash, family = None, None
        if model is None:
            self.problem(raw, "model", f"missing (allowed: {', '.join(self.registry.names()) or 'none registered'})")
        else:
            try:
                model_hash = self.registry.identity(model)
                family = self.registry.get(model).family
            except InvalidInput as e:
                self.problem(raw, "model", str(e))
        if family == "sdxl" and values.get("clip_skip", 1) not in (1, "1"):
            self.problem(raw, "clip_skip", f"does not apply to SDXL (model {model!r} always uses the penultimate"
                                           " layer, as A1111 does); leave it out")
            return None
        values, assets_ok = self.assets(raw, values, family)
        try:  # check the other fields even when the model is bad: report everything at once
            job = RenderJob.model_validate({**values, "model": "unknown", "model_hash": "0" * 64}
                                           if model_hash is None else {**values, "model_hash": model_hash})
            return job if model_hash is not None and assets_ok else None
        except ValidationError as e:
            for err in e.errors():
                fld = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] != "value_error":
                    msg = f"{msg} (got {err['input']!r})"
                self.problem(raw, fld, msg)
            return None


    def assets(self, raw: RawItem, values: dict[str, Any], family: str | None) -> tuple[dict[str, Any], bool]:
        """Fill in the registry's hashes: LoRAs from the loras field and the prompt's <lora:...> tags,
        embeddings named in the prompts, the VAE, upscaler models. Unknown names, and LoRAs and VAEs
        made for another model family, are reported here; shapes by RenderJob. As in A1111, an
        embedding of another family is not one: its name in an SDXL prompt is plain text."""
        ok = True
        out = dict(values)
        prompt = values.get("prompt")
        try:
            tags = lora_tags(prompt) if isinstance(prompt, str) else []
        except ValueError:
            tags = []  # RenderJob reports the malformed tag against the prompt
        given = parse_loras(values.get("loras", []))
        if isinstance(given, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in given):
            loras = [dict(x) for x in given]  # a name given twice is RenderJob's to report
            for name, weight in tags:
                if all(x["name"] != name for x in loras):
                    loras.append({"name": name, "weight": weight})
            for i, item in enumerate(loras):
                try:
                    item["sha256"] = self.registry.asset_identity("lora", item["name"], family)
                except InvalidInput as e:
                    self.problem(raw, f"loras.{i}.name", str(e))
                    item["sha256"], ok = "0" * 64, False
            if loras:
                out["loras"] = loras
        texts = [t.lower() for t in (prompt, values.get("negative_prompt")) if isinstance(t, str)]
        embeddings = []
        for name in self.registry.asset_names("embedding", family):
            # the tokenizer matches an embedding's (lower-cased) name anywhere in the lower-cased text
            if any(name.lower() in text for text in texts):
                try:
                    embeddings.append({"name": name, "sha256": self.registry.asset_identity("embedding", name)})
                except InvalidInput as e:
                    self.problem(raw, "prompt", str(e))
                    ok = False
        if embeddings:
            out["embeddings"] = embeddings
        if values.get("vae") is not None:
            try:
                sha256 = self.registry.asset_identity("vae", values["vae"], family)
                out["vae"] = {"name": values["vae"], "sha256": sha256}
            except InvalidInput as e:
                self.problem(raw, "vae", str(e))
                out.pop("vae")
                ok = False
        for fld, builtin in (("hires", HIRES_UPSCALERS), ("upscale", IMAGE_UPSCALERS)):
            spec = values.get(fld)
            if not isinstance(spec, dict) or not isinstance(spec.get("upscaler"), str) or spec["upscaler"] in builtin:
                continue  # RenderJob reports the shapes
            registered = self.registry.asset_names("upscaler")
            try:
                if spec["upscaler"] not in registered:
                    raise InvalidInput(f"unknown upscaler {spec['upscaler']!r}"
                                       f" (allowed: {', '.join([*builtin, *registered])})")
                out[fld] = {**spec, "upscaler_sha256": self.registry.asset_identity("upscaler", spec["upscaler"])}
            except InvalidInput as e:
                self.problem(raw, f"{fld}.upscaler", str(e))
                out[fld] = {k: v for k, v in spec.items() if k != "upscaler"}
                ok = False
        for fld in ("init_image", "mask_image"):
            if isinstance(values.get(fld), str):
                try:
                    out[fld] = self.inputs.resolve(values[fld])
                except InvalidInput as e:
                    self.problem(raw, fld, str(e))
                    out.pop(fld)
                    ok = False
        if values.get("mask_prompt") is not None:
            name = values.get("mask_model", DEFAULT_MASK_MODEL)
            try:
                out["mask_model"] = {"name": name, "sha256": self.registry.asset_identity("mask_model", name)}
            except InvalidInput as e:
                self.problem(raw, "mask_model", str(e))
                out["mask_model"], ok = {"name": "unknown", "sha256": "0" * 64}, False
        elif isinstance(values.get("mask_model"), str):
            self.problem(raw, "mask_model", "goes with mask_prompt")
            out.pop("mask_model")
            ok = False
        return out, ok


def plan_batch(
    text: str,
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    """Parse, expand and validate a whole batch. Raises BatchInvalid listing every problem."""
    header, items = read_batch(text, source, fmt)
    return plan_items(header, items, source, fmt, registry, max_jobs, overrides, name, inputs)


def plan_items(
    header: dict[str, Any],
    items: list[RawItem],
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    """Expand and validate parsed items (from a batch file, or generated from a dataset spec).
    `inputs` reads init images and masks (the bucket, SDFARM_INPUTS_DIR); without it they are refused."""
    planner = _Planner(source, registry, max_jobs, inputs)
    defaults: dict[str, Any] = {**header.get("defaults", {}), **(overrides or {})}
    for key in defaults:
        if key not in ITEM_KEYS or key == "matrix":
            planner.problem(None, f"defaults.{key}", f"unknown field (allowed: {', '.join(ITEM_KEYS[:-1])})")
    batch_seed = header.get("seed", 0)
    if isinstance(batch_seed, bool) or not isinstance(batch_seed, int) or not 0 <= batch_seed <= MAX_SEED:
        planner.problem(None, "seed", f"{batch_seed!r} is not allowed (allowed: an integer 0..{MAX_SEED})")
        batch_seed = 0
    batch_name = name or header.get("name") or Path(source).stem
    if not isinstance(batch_name, str) or len(batch_name) > 200:
        planner.problem(None, "name", "expected a string of at most 200 characters")
        batch_name = Path(source).stem
    top_matrix = planner.check_matrix(None, header["matrix"], "matrix") if "matrix" in header else {}
    if not items:
        planner.problem(None, "", "the batch holds no items")

    jobs: list[RenderJob] = []
    total = 0
    for raw in items:
        for values in planner.expand(raw, defaults, top_matrix, batch_seed):
            total += 1
            if total > max_jobs:
                break
            job = planner.job(raw, values)
            if job is not None:
                jobs.append(job)
        if total > max_jobs:
            planner.problem(
                None, "", f"the batch expands to more than {max_jobs} jobs"
                f" (allowed: at most {max_jobs}; the cap is SDFARM_MAX_JOBS_PER_BATCH)"
            )
            break
    if planner.problems:
        raise BatchInvalid(planner.problems)

    job_ids = [j.id for j in jobs]
    batch_id = hashlib.sha256(json.dumps([batch_name, job_ids]).encode()).hexdigest()[:20]
    models = {j.model: j.model_hash for j in jobs}
    spec = {
        "schema_version": 1,
        "batch_id": batch_id,
        "name": batch_name,
        "seed": batch_seed,
        "source": Path(source).name,
        "format": fmt,
        "defaults": defaults,
        "matrix": top_matrix,
        "items": [r.data for r in items],
        "job_count": len(jobs),
        "models": models,
    }
    return BatchPlan(batch_id=batch_id, name=batch_name, seed=batch_seed, jobs=tuple(jobs), spec=spec,
                     uploads=dict(planner.inputs.uploads))


def _file_problem(path: Path, message: str) -> Problem:
    return Problem(str(path), None, None, "", message)


def plan_file(
    path: Path,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        allowed = ", ".join(FORMATS)
        raise BatchInvalid([_file_problem(path, f"unknown file type {path.suffix!r} (allowed: {allowed})")])
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BatchInvalid([_file_problem(path, f"file is {size} bytes (allowed: at most {MAX_FILE_BYTES})")])
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BatchInvalid([_file_problem(path, f"not UTF-8 text: {e.reason} at byte {e.start}")]) from e
    except OSError as e:
        raise BatchInvalid([_file_problem(path, f"cannot read: {e.strerror}")]) from e
    return plan_batch(text, str(path), fmt, registry, max_jobs, overrides, name, inputs)
