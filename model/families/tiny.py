"""Parts the tiny presets share: the VAE shape, a T5 encoder with a tokenizer built offline, model_index.json.

T5's real tokenizer is a SentencePiece model that cannot be fetched offline (and ``sentencepiece`` is not
installed), so :func:`save_t5_tokenizer` builds a real ``T5TokenizerFast`` from a small Unigram vocabulary
made here: T5's special tokens, common caption words with the ``▁`` word-start marker, and every printable
ASCII character with and without it, so any English prompt tokenizes (unknown words fall back to characters).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

T5_WORDS = (
    "a an the of and in on with at to is are photo picture image drawing painting of red green blue yellow "
    "black white orange purple pink brown grey gray circle square background dog cat person man woman house "
    "tree sky car city street room table high quality detailed"
).split()


def tiny_vae(latent_channels: int = 4, **config):
    """The tiny SD's VAE shape (x8, as the SD ControlNet condition encoder downsamples), any latent width."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        latent_channels=latent_channels,
        sample_size=64,
        block_out_channels=(8, 16, 32, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        force_upcast=False,
        **config,
    )


def save_t5_tokenizer(out_dir: Path, max_length: int = 32) -> int:
    """Write a T5 tokenizer (Unigram) over a vocabulary built here; return its size."""
    from transformers import T5TokenizerFast

    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    pieces |= {"▁" + w: -1.0 for w in T5_WORDS}
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces |= {c: -5.0 for c in chars} | {"▁" + c: -4.0 for c in chars}
    tokenizer = T5TokenizerFast(vocab=list(pieces.items()), extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)


def tiny_t5(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def write_index(out_dir: Path, class_name: str, **components) -> None:
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1", **components}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
