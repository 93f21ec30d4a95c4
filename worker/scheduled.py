"""Prompts whose conditioning changes while sampling, or combines several: A1111's prompt editing,
alternation and AND (sdfarm.prompt_schedule), as its CFG denoiser runs them
(modules/sd_samplers_cfg_denoiser.py, CFGDenoiser.forward and combine_denoised).

The pipeline runs as usual; at each UNet call, hooks put in each image's conditionings for that
call (its subprompts as they stand at this step, and its uncond) and hand back what the pipeline's
guidance expects, so that it computes

    denoised = uncond + cfg x sum(weight x (cond - uncond))

An image's subprompts are padded to their longest by repeating the last vector, as A1111 stacks
conds; everything past a row's own length is masked out of cross-attention (its uncond renders at its
own length), so an image never depends on the jobs batched with it. The call counter is A1111's
`step`: it counts model calls from 0, which a second-order sampler makes two of per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from sdfarm.extra_networks import strip_tags
from sdfarm.jobs import RenderJob
from sdfarm.prompt_schedule import at_step, schedule, split_and
from sdfarm.samplers import SECOND_ORDER

from .adapters import embedding_tokens
from .prompts import CHUNK_TOKENS, Conditioning, encode_prompts, own_lengths


@dataclass(frozen=True)
class Encoded:
    """One text's conditioning at its own length: [L, D], and SDXL's pooled [P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None


@dataclass
class ImagePlan:
    """One image's conditionings over the pass: (weight, schedule) per subprompt, and its uncond's
    schedule; a schedule is (last call, conditioning) pairs."""

    conds: list[tuple[float, list[tuple[int, Encoded]]]]
    uncond: list[tuple[int, Encoded]]


def model_calls(sampler: str, steps: int) -> int:
    """The steps A1111 schedules prompts over (sd_samplers_common.py, SamplerData.total_steps): 2 x
    steps for second-order samplers, which make about two model calls a step."""
    return steps * 2 if sampler in SECOND_ORDER else steps


# a render's plain conditionings by the texts encoded: a hires pass with the first pass's prompts
# reuses them rather than running the text encoders again
Encodings = dict[tuple[tuple[str, str], ...], Conditioning]


@contextmanager
def conditioned(pipe: Any, jobs: list[RenderJob], sampler: str, steps: int, guidance_scale: float,
                encodings: Encodings, hires_of: int | None = None, first_call: int = 0
                ) -> Iterator[dict[str, torch.Tensor]]:
    """The prompt arguments of one pass's pipeline call (steps: the pass's; hires_of: the first pass's
    model calls, for the hires pass), with the UNet hooks the pass needs installed while it runs:
    this module's for jobs that may schedule or combine prompts (RenderJob.scheduled), else each
    side at its own length (prompts.own_lengths). encodings: the render's, shared by its passes, for
    this pipeline's text encoders. first_call: the pass's model calls made before this UNet's first
    (a refiner's, taking over)."""
    if jobs[0].scheduled:
        plans = plan_pass(pipe, jobs, model_calls(sampler, steps), hires_of)
        with scheduled(pipe.unet, plans, guidance_scale, first_call):
            yield placeholder(plans)
        return
    texts = tuple(j.texts(hires=hires_of is not None) for j in jobs)
    if texts not in encodings:
        encodings[texts] = encode_prompts(pipe, [strip_tags(p) for p, _ in texts], [n for _, n in texts],
                                          jobs[0].clip_skip, [embedding_tokens(j) for j in jobs])
    with own_lengths(pipe.unet, encodings[texts]):
        yield encodings[texts].kwargs()


def plan_pass(pipe: Any, jobs: list[RenderJob], calls: int, hires_of: int | None = None) -> list[ImagePlan]:
    """Each job's conditionings for a pass of `calls` model calls (hires_of: the first pass's, for the
    hires pass, whose edit times count on from it). Every distinct text is encoded once."""
    clip_skip = jobs[0].clip_skip
    wanted: dict[tuple[str, frozenset[str], bool], Encoded | None] = {}
    layouts = []
    for job in jobs:
        tokens = embedding_tokens(job)
        prompt, negative = job.texts(hires=hires_of is not None)
        conds = [(weight, schedule(text, calls, hires_of)) for text, weight in split_and(strip_tags(prompt))]
        uncond = schedule(negative, calls, hires_of)
        for _, entries in conds:
            wanted.update({(text, tokens, False): None for _, text in entries})
        wanted.update({(text, tokens, True): None for _, text in uncond})
        layouts.append((tokens, conds, uncond))
    keys = list(wanted)
    for tokens in {k[1] for k in keys}:
        group = [k for k in keys if k[1] == tokens]
        for key, encoded in zip(group, _encode(pipe, group, clip_skip), strict=True):
            wanted[key] = encoded

    def resolved(entries: list[tuple[int, str]], tokens: frozenset[str], negative: bool) -> list[tuple[int, Encoded]]:
        out = []
        for last, text in entries:
            encoded = wanted[text, tokens, negative]
            assert encoded is not None
            out.append((last, encoded))
        return out

    return [ImagePlan([(w, resolved(e, tokens, False)) for w, e in conds], resolved(uncond, tokens, True))
            for tokens, conds, uncond in layouts]


def _encode(pipe: Any, keys: list[tuple[str, frozenset[str], bool]], clip_skip: int) -> list[Encoded]:
    """Texts as positive prompts at their own lengths (an SDXL negative that is empty is zeros, as in
    A1111); all with the same embeddings."""
    texts = [text for text, _, _ in keys]
    with torch.inference_mode():
        encoded = encode_prompts(pipe, texts, [""] * len(texts), clip_skip, [keys[0][1]] * len(texts))
    out = []
    for i, (text, _, negative) in enumerate(keys):
        embeds = encoded.prompt_embeds[i, :encoded.lengths[i]]
        pooled = encoded.pooled_prompt_embeds[i] if encoded.pooled_prompt_embeds is not None else None
        if negative and text == "" and pooled is not None:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        out.append(Encoded(embeds, pooled))
    return out


def placeholder(plans: list[ImagePlan]) -> dict[str, torch.Tensor]:
    """Prompt embeddings of the shape, dtype and device the pipeline expects (one row a job, each
    side), zeros: the hooks replace them at every UNet call."""
    sample = plans[0].uncond[0][1]
    embeds = sample.embeds.new_zeros((len(plans), CHUNK_TOKENS + 2, sample.embeds.shape[-1]))
    out = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds}
    if sample.pooled is not None:
        pooled = sample.pooled.new_zeros((len(plans), sample.pooled.shape[-1]))
        out |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": pooled}
    return out


class _Takeover:
    """The UNet hooks of one pass: `before` puts in each image's conditionings at this model call,
    `after` gives back what the pipeline's guidance expects."""

    def __init__(self, plans: list[ImagePlan], guidance_scale: float, first_call: int = 0) -> None:
        self.plans, self.guidance_scale = plans, guidance_scale
        self.call = first_call  # A1111's step: model calls so far
        self.rows: list[tuple[int, list[float]]] = []  # per image: its uncond row and its conds' weights
        self.cfg = True

    def before(self, _m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images = len(self.plans)
        sample, timestep = args[0], args[1] if len(args) > 1 else kwargs.pop("timestep")
        hidden = kwargs["encoder_hidden_states"]
        self.cfg = hidden.shape[0] == 2 * images
        latents = sample[images:] if self.cfg else sample
        added = kwargs.get("added_cond_kwargs")
        xs, texts, times = [], [], []
        self.rows = []
        for i, plan in enumerate(self.plans):
            conds = [(w, at_step(entries, self.call)) for w, entries in plan.conds]
            longest = max(c.embeds.shape[0] for _, c in conds)
            for _, c in conds:  # A1111's stack_conds: an image's conds padded with their last vector
                texts.append((Encoded(torch.cat([c.embeds, c.embeds[-1:].expand(longest - len(c.embeds), -1)]),
                                      c.pooled), longest))
            texts.append((at_step(plan.uncond, self.call), None))
            xs.extend([latents[i]] * (len(conds) + 1))
            if added:  # SDXL's size conditioning: the cond half's rows for conds, the uncond half's for it
                times.extend([added["time_ids"][images + i if self.cfg else i]] * len(conds) + [added["time_ids"][i]])
            self.rows.append((len(xs) - 1, [w for w, _ in conds]))
        owns = [own or len(e.embeds) for e, own in texts]
        total = max(owns)
        stacked = torch.stack([torch.cat([e.embeds, e.embeds.new_zeros((total - len(e.embeds), e.embeds.shape[1]))])
                               for e, _ in texts])
        kwargs = {**kwargs, "encoder_hidden_states": stacked.to(hidden.device, hidden.dtype),
                  "encoder_attention_mask": (torch.arange(total)[None, :] < torch.tensor(owns)[:, None]).to(
                      hidden.device)}
        if added:
            pooled = torch.stack([e.pooled for e, _ in texts if e.pooled is not None])
            kwargs["added_cond_kwargs"] = {**added, "time_ids": torch.stack(times), "text_embeds": pooled.to(
                added["text_embeds"].device, added["text_embeds"].dtype)}
        self.call += 1
        return (torch.stack(xs), timestep), kwargs

    def after(self, _m: Any, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output.sample
        unconds, combined = [], []
        for uncond_row, weights in self.rows:
            uncond, first = out[uncond_row], uncond_row - len(weights)
            unconds.append(uncond)
            if weights == [1.0]:  # one prompt: the pipeline's own guidance, exactly
                combined.append(out[first])
            else:
                combined.append(uncond + sum(w * (out[first + k] - uncond) for k, w in enumerate(weights)))
        if self.cfg:
            result = torch.cat([torch.stack(unconds), torch.stack(combined)])
        elif self.guidance_scale == 1:  # no uncond half: the combination is the prediction
            result = torch.stack(combined)
        else:  # no uncond half (cfg < 1): A1111's combination at this cfg
            result = torch.stack([u + self.guidance_scale * (c - u) for u, c in zip(unconds, combined, strict=True)])
        if isinstance(output, tuple):
            return (result, *output[1:])
        output.sample = result
        return output


@contextmanager
def scheduled(unet: Any, plans: list[ImagePlan], guidance_scale: float, first_call: int = 0) -> Iterator[None]:
    """While the pipeline runs, every UNet call renders each image's conditionings at this call (the
    first one this UNet gets is call `first_call`). The hooks run eagerly (torch.compiler.disable),
    between a compiled UNet's calls."""
    takeover = _Takeover(plans, guidance_scale, first_call)
    hooks = [unet.register_forward_pre_hook(torch.compiler.disable(takeover.before), with_kwargs=True),
             unet.register_forward_hook(torch.compiler.disable(takeover.after), with_kwargs=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
