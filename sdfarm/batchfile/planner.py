"""Expansion and validation: an item's matrix and seeds expanded into jobs, each checked strictly,
with the registry's hashes of the model and every asset it names filled in."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from ..errors import MAX_PROBLEMS, InvalidInput, Problem, brief
from ..extra_networks import lora_tags
from ..inputs import Inputs
from ..jobs import (
    DEFAULT_MASK_MODEL,
    HIRES_UPSCALERS,
    IMAGE_UPSCALERS,
    MAX_LORAS,
    MAX_SEED,
    USER_FIELDS,
    HiresFix,
    LoraRef,
    RenderJob,
    Upscale,
    parse_loras,
)
from ..models import Registry
from ..prompt_syntax import embedding_pattern
from .items import ITEM_KEYS, MAX_COUNT, MAX_NAME_CHARS, RawItem, control_character, strict_int

TEXT_FIELDS: Final = ("prompt", "negative_prompt", "mask_prompt")


def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields pydantic would fill from true/false (as 1/0), which a batch must not."""
    return frozenset(name for name, f in model.model_fields.items() if f.annotation in (int, float))


_NUMERIC: Final = {"": _numeric_fields(RenderJob), "hires": _numeric_fields(HiresFix),
                   "upscale": _numeric_fields(Upscale), "loras": _numeric_fields(LoraRef)}


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

    @property
    def stopped(self) -> bool:
        """Enough problems to refuse the batch: validation stops here."""
        return len(self.problems) >= MAX_PROBLEMS

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
            self.problem(raw, where, f"expected a mapping of field to list of values, got {brief(matrix)}")
            return {}
        good: dict[str, list[Any]] = {}
        for key, values in matrix.items():
            if key not in USER_FIELDS:
                self.problem(raw, f"{where}.{key}", f"unknown field (allowed: {', '.join(USER_FIELDS)})")
            elif not isinstance(values, list) or not values:
                self.problem(raw, f"{where}.{key}", f"expected a non-empty list of values, got {brief(values)}")
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
                self.problem(raw, "seeds", f"expected a non-empty list of integers 0..{MAX_SEED}, got {brief(seeds)}")
                return None
            return list(seeds)
        n = 1 if count is None else strict_int(count)
        if n is None or not 1 <= n <= MAX_COUNT:  # 2.9, true, .inf: refused, never rounded
            self.problem(raw, "count", f"{brief(count)} is not allowed (allowed: an integer 1..{MAX_COUNT})")
            return None
        if "seed" in values:  # A1111's batch convention: seed, seed+1, ...
            first = strict_int(values["seed"])
            if first is None:
                self.problem(raw, "seed", f"{brief(values['seed'])} is not allowed (allowed: an integer 0..{MAX_SEED})")
                return None
            return [first + k for k in range(n)]  # out of range: the job model reports it
        return [derive_seed(batch_seed, raw.item - 1, k) for k in range(n)]

    def expand(self, raw: RawItem, defaults: dict[str, Any], top_matrix: dict[str, list[Any]], batch_seed: int
               ) -> Iterator[tuple[dict[str, Any], list[Any]]]:
        """Each combination of the item's matrix, with its seeds: one job per seed, the combination's
        values plus that seed."""
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
            if "seed" in base:  # the matrix swept the seed itself: one job
                yield base, [base["seed"]]
            else:
                yield base, seeds

    def job(self, raw: RawItem, values: dict[str, Any]) -> RenderJob | None:
        model = values.get("model")
        model_hash, family = None, None
        strict = self.strict(raw, values)
        if model is None:
            self.problem(raw, "model", f"missing (allowed: {', '.join(self.registry.names()) or 'none registered'})")
        elif not isinstance(model, str) or len(model) > MAX_NAME_CHARS:
            self.problem(raw, "model", f"unknown model {brief(model)}"
                                       f" (allowed: {', '.join(self.registry.names()) or 'none registered'})")
        else:
            try:
                family = self.registry.renderable(model).family
                model_hash = self.registry.identity(model)
            except InvalidInput as e:
                self.problem(raw, "model", str(e))
        values, assets_ok = self.assets(raw, values, family)
        try:  # check the other fields even when the model is bad: report everything at once
            job = RenderJob.model_validate({**values, "model": "unknown", "model_hash": "0" * 64}
                                           if model_hash is None else {**values, "model_hash": model_hash})
            return job if model_hash is not None and assets_ok and strict else None
        except ValidationError as e:
            for err in e.errors():
                fld = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] != "value_error":
                    msg = f"{msg} (got {brief(err['input'])})"
                self.problem(raw, fld, msg)
            return None

    def strict(self, raw: RawItem, values: dict[str, Any]) -> bool:
        """What pydantic would let through but a batch must not: true/false for a number (pydantic
        reads it as 1/0), and control characters in a prompt (they would reach the PNG's text).
        One pass over the job's values: it runs for every job validated in full."""
        ok = True
        for key, value in values.items():
            if value is True or value is False:
                ok = self._not_bool(raw, key, "", value) and ok
            elif isinstance(value, str):
                found = control_character(value) if key in TEXT_FIELDS else None
                if found:
                    self.problem(raw, key, f"{found} is not allowed (allowed: text, tabs and line breaks)")
                    ok = False
            elif isinstance(value, dict) and key in _NUMERIC:
                ok = all([self._not_bool(raw, f"{key}.{k}", key, v) for k, v in value.items() if isinstance(v, bool)]
                         ) and ok
            elif key == "loras" and isinstance(value, list):
                ok = all([self._not_bool(raw, f"loras.{i}.{k}", key, v) for i, x in enumerate(value)
                          if isinstance(x, dict) for k, v in x.items() if isinstance(v, bool)]) and ok
        return ok

    def _not_bool(self, raw: RawItem, where: str, section: str, value: bool) -> bool:
        if where.rsplit(".", 1)[-1] not in _NUMERIC[section]:
            return True  # not a number field: the job model says what it wants
        self.problem(raw, where, f"{value} is not allowed (allowed: a number, not true or false)")
        return False

    def assets(self, raw: RawItem, values: dict[str, Any], family: str | None) -> tuple[dict[str, Any], bool]:
        """Fill in the registry's hashes: LoRAs from the loras field and the prompt's <lora:...> tags,
        embeddings named in the prompts, the VAE, upscaler models. Unknown names, and LoRAs and VAEs
        made for another model family, are reported here; shapes by RenderJob. As in A1111, an
        embedding of another family is not one: its name in an SDXL prompt is plain text."""
        out = dict(values)
        oks = [self._loras(raw, values, family, out), self._embeddings(raw, values, family, out),  # each reports
               self._vae(raw, values, family, out), self._refiner(raw, values, family, out),
               self._upscalers(raw, values, out),
               self._inputs(raw, values, out), self._mask_model(raw, values, out)]
        return out, all(oks)

    def _loras(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        ok = True
        prompt = values.get("prompt")
        try:
            tags = lora_tags(prompt) if isinstance(prompt, str) else []
        except ValueError:
            tags = []  # RenderJob reports the malformed tag against the prompt
        given = parse_loras(values.get("loras", []))
        if isinstance(given, list) and len(given) <= MAX_LORAS \
                and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in given):
            loras = [dict(x) for x in given]  # a name given twice is RenderJob's to report
            for tag in tags:
                if all(x["name"] != tag.name for x in loras):
                    loras.append({"name": tag.name, "weight": tag.weight}
                                 | ({"unet_weight": tag.unet_weight} if tag.unet_weight is not None else {}))
            for i, item in enumerate(loras):
                try:
                    item["sha256"] = self.registry.asset_identity("lora", item["name"], family)
                except InvalidInput as e:
                    self.problem(raw, f"loras.{i}.name", str(e))
                    item["sha256"], ok = "0" * 64, False
            if loras:
                out["loras"] = loras
        return ok

    def _embeddings(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        ok = True
        given = values.get("hires")
        hires: dict[str, Any] = given if isinstance(given, dict) else {}
        texts = [t for t in (values.get("prompt"), values.get("negative_prompt"), hires.get("prompt"),
                             hires.get("negative_prompt")) if isinstance(t, str)]
        embeddings = []
        for name in self.registry.asset_names("embedding", family):
            if any(embedding_pattern(name).search(text) for text in texts):
                try:
                    embeddings.append({"name": name, "sha256": self.registry.asset_identity("embedding", name)})
                except InvalidInput as e:
                    self.problem(raw, "prompt", str(e))
                    ok = False
        if embeddings:
            out["embeddings"] = embeddings
        return ok

    def _vae(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        if values.get("vae") is None:
            return True
        if not isinstance(values["vae"], str) or len(values["vae"]) > MAX_NAME_CHARS:
            self.problem(raw, "vae", f"unknown vae {brief(values['vae'])} (allowed: a registered VAE's name)")
            out.pop("vae")
            return False
        try:
            sha256 = self.registry.asset_identity("vae", values["vae"], family)
            out["vae"] = {"name": values["vae"], "sha256": sha256}
            return True
        except InvalidInput as e:
            self.problem(raw, "vae", str(e))
            out.pop("vae")
            return False

    def _refiner(self, raw: RawItem, values: dict[str, Any], family: str | None, out: dict[str, Any]) -> bool:
        name = values.get("refiner")
        if name is None:
            return True
        out["refiner"] = {"name": "unknown", "sha256": "0" * 64}  # in its place, so the job's checks go on
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            self.problem(raw, "refiner", f"unknown refiner {brief(name)} (allowed: a registered model's name)")
            return False
        try:
            sha256 = self.registry.refiner_identity(name, family) if family else self.registry.identity(name)
        except InvalidInput as e:
            self.problem(raw, "refiner", str(e))
            return False
        out["refiner"] = {"name": name, "sha256": sha256}
        return True

    def _upscalers(self, raw: RawItem, values: dict[str, Any], out: dict[str, Any]) -> bool:
        ok = True
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
        return ok

    def _inputs(self, raw: RawItem, values: dict[str, Any], out: dict[str, Any]) -> bool:
        ok = True
        for fld in ("init_image", "mask_image"):
            if isinstance(values.get(fld), str):
                try:
                    out[fld] = self.inputs.resolve(values[fld])
                except InvalidInput as e:
                    self.problem(raw, fld, str(e))
                    out.pop(fld)
                    ok = False
        return ok

    def _mask_model(self, raw: RawItem, values: dict[str, Any], out: dict[str, Any]) -> bool:
        if values.get("mask_prompt") is not None:
            name = values.get("mask_model", DEFAULT_MASK_MODEL)
            if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
                self.problem(raw, "mask_model", f"unknown mask_model {brief(name)} (allowed: a registered name)")
                out["mask_model"] = {"name": "unknown", "sha256": "0" * 64}
                return False
            try:
                out["mask_model"] = {"name": name, "sha256": self.registry.asset_identity("mask_model", name)}
                return True
            except InvalidInput as e:
                self.problem(raw, "mask_model", str(e))
                out["mask_model"] = {"name": "unknown", "sha256": "0" * 64}
                return False
        if isinstance(values.get("mask_model"), str):
            self.problem(raw, "mask_model", "goes with mask_prompt")
            out.pop("mask_model")
            return False
        return True
