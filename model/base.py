"""Find the base model's files, one way for every stage, and build the tiny SD built in code.

A base model is a diffusers-format directory (``model_index.json`` + its component folders, e.g. SD's
``unet/ vae/ text_encoder/ tokenizer/ scheduler/``); ``model.families.load`` loads it with its family's
adapter. :func:`resolve_base_dir` accepts:

* ``tiny`` - a tiny SD built from configs in code with a fixed seed and CLIP's real tokenizer,
  saved once in diffusers format under the cache dir, then loaded like any other directory;
* ``shapes`` - the same size, pretrained on Fill50K-style circles by ``zeroconv pretrain-base`` (32 px,
  a VAE downsampling x4); its fp16 weights ship in the package (model/assets/shapes) and load as fp32;
* a local directory;
* ``s3://bucket/prefix`` - copied to the cache dir first, once per version of its files (see
  :func:`s3_base_dir`);
* a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (needs network).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import torch

TINY = "tiny"
SHAPES = "shapes"
SHAPES_DIR = Path(__file__).parent / "assets" / "shapes"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What a hub snapshot fetches: the component folders of every family (model/families), not only SD's.
HUB_FOLDERS = COMPONENTS + ("transformer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_base_dir(source: str, storage=None) -> Path:
    """Turn any accepted ``source`` into a local diffusers directory (building or copying as needed)."""
    from pipelines.common.storage import cache_dir

    if source == TINY:
        return ensure_tiny(cache_dir() / "tiny-sd")
    if source == SHAPES:
        if not (SHAPES_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the shapes base is not in this installation ({SHAPES_DIR}); build it with "
                "'zeroconv pretrain-base out=DIR' and use base_model.source=DIR"
            )
        return SHAPES_DIR
    if source.startswith("s3://"):
        dest = s3_base_dir(source, storage)
        _check_diffusers_dir(dest, source)
        return dest
    path = Path(source).expanduser()
    if path.exists():
        _check_diffusers_dir(path, source)
        return path.resolve()
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(source, allow_patterns=[f"{c}/*" for c in HUB_FOLDERS] + ["model_index.json"])
            )
        except Exception as exc:  # offline, unknown repo, gated...
            raise FileNotFoundError(
                f"base model {source!r} is not a local directory and could not be fetched from the hub "
                f"({type(exc).__name__}). Use 'tiny', 'shapes', a local diffusers directory or an s3:// URI."
            ) from None
    raise FileNotFoundError(
        f"base model {source!r} does not exist. Use 'tiny', 'shapes', a local diffusers directory, "
        f"an s3:// URI or a hub id like 'org/name'."
    )


def s3_base_dir(source: str, storage=None) -> Path:
    """The local copy of an ``s3://`` base model, downloaded once per version of its files.

    The cache key is the listing (each file's path, size and LastModified, which every upload changes), so
    a model replaced on S3 is downloaded again. Workers on one node share the download: a file lock lets
    one copy into a temp dir while the others wait, and the finished copy is renamed into place, so a
    download killed part-way is never mistaken for a model (its temp dir is removed by the next one)."""
    import shutil
    import tempfile

    from filelock import FileLock

    from pipelines.common import storage as store

    src = store.resolve(source, storage)
    files = src.list_files()
    if not files:
        raise FileNotFoundError(
            f"base model {source!r} does not exist. Use 'tiny', 'shapes', a local diffusers directory, "
            f"an s3:// URI or a hub id like 'org/name'."
        )
    listing = sorted((f.path[len(src.path) :], f.size, f.mtime_ns) for f in files)
    root = store.cache_dir() / "s3" / hashlib.sha256(source.encode()).hexdigest()[:16]
    dest = root / hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):
        if dest.is_dir():  # another worker finished it while this one waited
            return dest
        for stale in root.glob(".download-*"):  # left by a download that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
        store.download_dir(source, tmp, storage)
        tmp.rename(dest)
    return dest


def _check_diffusers_dir(path: Path, source: str) -> None:
    if not path.is_dir():
        raise ValueError(f"base model {source!r} is a file, not a diffusers model directory")
    index = path / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") != "StableDiffusionPipeline":
        # Another family (SDXL, SD3, Flux): its model_index.json lists the component folders it needs.
        listed = json.loads(index.read_text())
        missing = [c for c, v in listed.items() if isinstance(v, list) and v[0] and not (path / c).is_dir()]
        if missing:
            raise ValueError(
                f"base model {source!r} is not a complete diffusers {listed.get('_class_name')} directory: "
                f"missing {', '.join(m + '/' for m in missing)}"
            )
        return
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ValueError(
            f"base model {source!r} is not a diffusers Stable Diffusion directory: "
            f"missing {', '.join(m + '/' for m in missing)} "
            "(expected model_index.json with unet/ vae/ text_encoder/ tokenizer/ scheduler/)"
        )


# ---------------------------------------------------------------------------------------------
# The built-in tiny model
# ---------------------------------------------------------------------------------------------

TINY_SEED = 0
TINY_VERSION = "2"  # bump when the configs below change, so stale caches are rebuilt


def ensure_tiny(dest: Path, build=None, version: str = TINY_VERSION) -> Path:
    """Build a tiny model into ``dest`` once (atomically) and return it.

    ``build(out_dir)`` writes the model (default: the tiny SD, :func:`build_tiny`); ``version`` names its
    configs, so a cache built from older ones is rebuilt. model/families passes its tiny presets here."""
    build = build or build_tiny
    marker = dest / "zeroconv_tiny.json"

    def built() -> bool:
        return marker.exists() and json.loads(marker.read_text()).get("version") == version

    if built():
        return dest
    import fcntl
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (e.g. Ray Train workers) may arrive at once: one builds, the others wait for it,
    # so nobody replaces a directory another process is already loading from.
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=dest.parent))
        build(tmp)
        (tmp / "zeroconv_tiny.json").write_text(json.dumps({"version": version, "seed": TINY_SEED}))
        if dest.exists():  # stale (older version)
            shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def build_tiny(out_dir: Path) -> None:
    """A ~3M-parameter SD 1.x look-alike: same structure and interfaces, 64x64 images, 8x8 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=64,
        block_out_channels=(8, 16, 32, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=49408,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet")
    vae.save_pretrained(out_dir / "vae")
    save_text_encoder(text_encoder, out_dir / "text_encoder")
    scheduler.save_pretrained(out_dir / "scheduler")
    save_clip_tokenizer(out_dir / "tokenizer")
    (out_dir / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )


def save_text_encoder(text_encoder, out_dir: Path) -> None:
    """Write a transformers model the way ``save_pretrained`` would, from any process.

    Not ``save_pretrained``: transformers writes weights only on torch.distributed rank 0, and a tiny model
    may be built by any rank of a training job. So write what save_pretrained adds to the config too: the
    class (diffusers' training scripts pick the text-encoder class from ``architectures[0]``) and the dtype."""
    from safetensors.torch import save_file

    text_encoder.config.architectures = [type(text_encoder).__name__]
    text_encoder.config.dtype = str(text_encoder.dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    text_encoder.config.save_pretrained(out_dir)
    state = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}  # T5 ties embeddings
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})


def save_clip_tokenizer(out_dir: Path) -> None:
    """CLIP's real BPE tokenizer, rebuilt from the vocabulary file that open_clip_torch ships."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # Positional paths: transformers 5.23 ignores the keyword forms here.
    tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
    tokenizer.save_pretrained(out_dir)


def _bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))
