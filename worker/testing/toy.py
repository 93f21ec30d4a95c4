"""The demo's trained toy models: their tokenizer and architectures, and where their committed weights
live. tools/train_shapes.py trains them on the shapes world (worker/testing/shapes.py); the demo and
the semantic tests load the weights committed under TRAINED.

Same components as Stable Diffusion 1.5 (a CLIP text encoder, a UNet with cross attention, a KL VAE
that downsamples 8x), scaled down to 64x64 images. The tokenizer is CLIP's byte-level BPE with merges
learned here over the shapes world's words, so each word is one token.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from .shapes import WORDS

TRAINED = Path(__file__).resolve().parent / "trained"
MODEL = TRAINED / "sd15"  # the base model, a diffusers folder
LORA = TRAINED / "loras" / "outlined.safetensors"  # draws a black rim round the shape
EMBEDDING = TRAINED / "embeddings" / "verdigris.safetensors"  # teal: the colour the base model has no word for
CLIPSEG = TRAINED / "clipseg"  # finds "background", "sky", "grass" and the shape words
HIDDEN = 64  # the text encoder's width


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, learned as BPE learns them (the most frequent pair first), until every word is
    one token: applied in this order, CLIP's tokenizer makes each word a single token."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(p) > 1 for p in pieces.values()):
        pairs = Counter((a, b) for p in pieces.values() for a, b in pairwise(p))
        best = max(sorted(pairs), key=lambda pair: pairs[pair])
        merges.append(best)
        for w, p in pieces.items():
            out, i = [], 0
            while i < len(p):
                if i + 1 < len(p) and (p[i], p[i + 1]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = out
    return merges


def write_tokenizer_files(folder: Path) -> int:
    """CLIP's byte-level vocabulary (the ids of worker.testing's tokenizer: start 512, end 513) plus a
    token for each shapes-world word, as `vocab.json` and `merges.txt`; returns the vocabulary's size."""
    from . import write_tokenizer_files as write_byte_vocabulary

    write_byte_vocabulary(folder)
    vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text())
    merges = learn_merges(list(WORDS))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def build_tokenizer() -> Any:
    """The toy models' CLIPTokenizer (77 tokens, padded with the end token as CLIP-L)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)


def build_text_encoder(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=HIDDEN,
        bos_token_id=512, eos_token_id=513, pad_token_id=513))


def build_vae() -> Any:
    """A KL VAE that downsamples 8x to 4 latent channels, as SD's (its scaling factor is set in training)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=16)


def build_clipseg(vocab_size: int) -> Any:
    """A small CLIPSeg: a ViT over 8x8 patches of the 64x64 image, the toy tokenizer's text encoder, a
    decoder of width 64."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    return CLIPSegForImageSegmentation(CLIPSegConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                     "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513},
        vision_config={"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        projection_dim=HIDDEN, reduce_dim=64, extract_layers=[1, 2, 3], decoder_num_attention_heads=4,
        decoder_intermediate_size=128))


def clipseg_processor() -> Any:
    from transformers import CLIPSegProcessor, ViTImageProcessor

    images = ViTImageProcessor(do_resize=True, size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3)
    return CLIPSegProcessor(image_processor=images, tokenizer=build_tokenizer())


def write_trained_model(dest: Path, replace: bool = False) -> Path:
    """Copy the committed trained base model (a diffusers folder) to `dest`, which must not hold
    anything yet (FileExistsError) unless `replace`: then what it holds is removed first."""
    if not (MODEL / "model_index.json").exists():
        raise FileNotFoundError(f"no trained model at {MODEL}: run tools/train_shapes.py")
    if dest.exists() and any(dest.iterdir()):
        if not replace:
            raise FileExistsError(f"{dest} is not empty: give a new folder")
        shutil.rmtree(dest)
    shutil.copytree(MODEL, dest, dirs_exist_ok=True)
    return dest


def write_trained_assets(folder: Path) -> dict[str, Path]:
    """Copy the trained companions under `folder`: the outlined LoRA, the verdigris (teal) embedding and the
    CLIPSeg mask model (same layout as worker.testing.write_tiny_assets)."""
    out = {"outlined": folder / "loras" / "outlined.safetensors",
           "verdigris": folder / "embeddings" / "verdigris.safetensors",
           "shapes-clipseg": folder / "mask_models" / "shapes-clipseg"}
    for source, target in ((LORA, out["outlined"]), (EMBEDDING, out["verdigris"])):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    shutil.copytree(CLIPSEG, out["shapes-clipseg"], dirs_exist_ok=True)
    return out
