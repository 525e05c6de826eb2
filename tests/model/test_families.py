"""Model families as adapters: the family read from the files, the zero-init identity and the policies per family."""

import json

import pytest
import torch

from model.families import family_of, load, param_groups, resolve

PRESETS = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
_BASES = {}


def base_of(family: str):
    if family not in _BASES:
        _BASES[family] = load(PRESETS[family])
    return _BASES[family]


def batch(base, n=2, seed=0):
    """Clean latents, prompt tensors and ControlNet inputs for ``n`` random 64x64 samples."""
    g = torch.Generator().manual_seed(seed)
    fam = base.family
    images = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        latents = fam.encode_images(base, images)
        prompt = fam.encode_prompts(base, ["a red circle", "a blue square"][:n], (64, 64))
        controls = fam.control_inputs(base, torch.rand(n, 3, 64, 64, generator=g))
    return latents, prompt, controls


@pytest.mark.parametrize("family", PRESETS)
def test_family_is_read_from_model_index(family):
    base_dir = resolve(PRESETS[family])
    assert family_of(base_dir).name == family
    assert (
        type(base_of(family).pipe).__name__ == json.loads((base_dir / "model_index.json").read_text())["_class_name"]
    )


def test_unknown_or_missing_pipeline_class_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="is a KandinskyPipeline pipeline; zeroconv supports StableDiffusionPipeline"):
        family_of(tmp_path)
    with pytest.raises(ValueError, match="has no model_index.json"):
        family_of(tmp_path / "empty")


def test_a_renamed_directory_keeps_its_family(tmp_path):
    # The name says "sdxl"; the files say SD3: the files win.
    import shutil

    shutil.copytree(resolve("tiny-sd3"), tmp_path / "my-sdxl-model")
    assert family_of(tmp_path / "my-sdxl-model").name == "sd3"


def test_t5_tokenizer_is_built_offline_and_loads_as_stock_t5():
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(resolve("tiny-sd3") / "tokenizer_3")
    ids = tok("a red circle, Zebra!").input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:3] == ["▁a", "▁red", "▁circle"] and pieces[-1] == "</s>"
    assert "<unk>" not in pieces and tok.decode(ids, skip_special_tokens=True) == "a red circle, Zebra!"


@pytest.mark.parametrize("family", PRESETS)
def test_fresh_controlnet_leaves_the_base_prediction_unchanged(family):
    """The paper's guarantee: base prediction + zero-initialised ControlNet residuals == base prediction, exactly."""
    base = base_of(family)
    latents, prompt, controls = batch(base)
    model = base.family.controlled(base, [base.family.new_controlnet(base)])
    noisy, timesteps, _ = base.family.noise(base, latents, torch.Generator().manual_seed(1))
    with torch.no_grad():
        controlled = model(noisy, timesteps, prompt, [controls])
        plain = model.base_prediction(noisy, timesteps, prompt)
        # The ControlNet does see the condition: its hidden path is not trivially zero.
        other = model(noisy, timesteps, prompt, [controls.flip(0)])
    assert controlled.shape == noisy.shape
    assert torch.equal(controlled, plain) and torch.equal(other, plain)
    assert plain.abs().sum() > 0


def test_sd_adapter_encodes_prompts_as_clips_last_hidden_state():
    base = base_of("sd")
    ours = base.family.encode_prompts(base, ["a red circle"], (64, 64))["prompt_embeds"]
    tokenizer = base.pipe.tokenizer
    ids = tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ours, base.pipe.text_encoder(ids.input_ids)[0])


def _train(base, policy, steps=3):
    model = base.family.controlled(base, [base.family.new_controlnet(base)])
    groups = param_groups(model, policy, lr=1e-2, base_lr=1e-2)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    net_before = {k: v.clone() for k, v in model.controlnets.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    latents, prompt, controls = batch(base)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss = base.family.loss(model, base, latents, prompt, [controls], generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.denoiser.state_dict().items() if not torch.equal(v, before[k])}
    net_changed = {k for k, v in model.controlnets.state_dict().items() if not torch.equal(v, net_before[k])}
    trainable = {n for n, p in model.denoiser.named_parameters() if p.requires_grad}
    model.denoiser.load_state_dict(before)  # the base is shared by the tests of this module
    model.denoiser.requires_grad_(False)
    return changed, net_changed, trainable


@pytest.mark.parametrize("family", PRESETS)
def test_locked_training_leaves_the_base_bit_identical(family):
    changed, net_changed, trainable = _train(base_of(family), "locked")
    assert changed == set() and trainable == set()
    assert net_changed  # the ControlNet did train


# What unlock_decoder means per family (docs/families/*.md): the denoiser parameters it trains.
DECODER_SIDE = {
    "sd": lambda n: n.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")),
    "sdxl": lambda n: n.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")),
    "sd3": lambda n: n.startswith(("transformer_blocks.1.", "norm_out.", "proj_out.")),
    "flux": lambda n: n.startswith(("single_transformer_blocks.", "norm_out.", "proj_out.")),
}


@pytest.mark.parametrize("family", PRESETS)
def test_unlock_decoder_trains_exactly_the_decoder_side(family):
    base = base_of(family)
    names = {n for n, _ in base.denoiser.named_parameters()}
    changed, _, trainable = _train(base, "unlock_decoder", steps=2)
    assert trainable == {n for n in names if DECODER_SIDE[family](n)} and trainable != names
    assert changed and changed <= trainable


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unlock_full_trains_the_whole_transformer(family):
    _, _, trainable = _train(base_of(family), "unlock_full", steps=1)
    assert trainable == {n for n, _ in base_of(family).denoiser.named_parameters()}


def test_unknown_policy_is_refused():
    base = base_of("flux")
    model = base.family.controlled(base, [base.family.new_controlnet(base)])
    with pytest.raises(ValueError, match="unknown trainability policy 'unlock_encoder'; choose one of locked"):
        param_groups(model, "unlock_encoder", 1e-5, 1e-6)


def test_flow_matching_target_and_timesteps():
    """SD3 noises on the rectified-flow line and takes s * 1000; Flux takes s (its transformer scales by 1000)."""
    for family, scale in (("sd3", 1000.0), ("flux", 1.0)):
        base = base_of(family)
        latents, _, _ = batch(base)
        noisy, timesteps, target = base.family.noise(base, latents, torch.Generator().manual_seed(3))
        s = (timesteps / scale).view(-1, *[1] * (latents.dim() - 1))
        assert ((timesteps / scale > 0) & (timesteps / scale < 1)).all()
        noise = target + latents
        torch.testing.assert_close(noisy, (1 - s) * latents + s * noise)


@pytest.mark.parametrize("family", PRESETS)
def test_prompt_dropout_replaces_every_text_tensor_of_the_same_rows(family):
    base = base_of(family)
    fam = base.family
    with torch.no_grad():
        prompt = fam.encode_prompts(base, ["a red circle", "a blue square", "green", "a dog"], (64, 64))
        empty = fam.encode_prompts(base, [""], (64, 64))
    assert fam.drop_prompts(prompt, empty, 0.0) is prompt
    dropped = fam.drop_prompts(prompt, empty, 0.5, torch.Generator().manual_seed(4))
    rows = {key: [torch.equal(dropped[key][i], empty[key][0]) for i in range(4)] for key in fam.text_keys}
    assert len({tuple(r) for r in rows.values()}) == 1  # the same samples lost every text tensor
    assert 0 < sum(next(iter(rows.values()))) < 4
    for key in set(prompt) - set(fam.text_keys):  # size ids, position ids: untouched
        assert torch.equal(dropped[key], prompt[key])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_condition_of_the_wrong_size_is_a_clear_error(family):
    base = base_of(family)
    latents, prompt, _ = batch(base)
    small = base.family.control_inputs(base, torch.rand(2, 3, 32, 32))
    model = base.family.controlled(base, [base.family.new_controlnet(base)])
    noisy, timesteps, _ = base.family.noise(base, latents)
    with pytest.raises(ValueError, match=f"{family}: condition encodes to shape .* but the latents have shape"):
        model(noisy, timesteps, prompt, [small])


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_tiny_presets_are_deterministic(preset, tmp_path):
    from safetensors.torch import load_file

    from model.families import TINY_PRESETS

    build, _ = TINY_PRESETS[preset]
    build(tmp_path / "again")
    denoiser = "unet" if preset == "tiny-sdxl" else "transformer"
    for part in (f"{denoiser}/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(resolve(preset) / part), load_file(tmp_path / "again" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_preset_cache_of_another_version_is_rebuilt(tmp_path):
    from model.base import ensure_tiny

    builds = []

    def build(out_dir):
        builds.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "weights").write_text(str(len(builds)))

    ensure_tiny(tmp_path / "tiny-x", build, version="1")
    ensure_tiny(tmp_path / "tiny-x", build, version="1")
    assert len(builds) == 1
    ensure_tiny(tmp_path / "tiny-x", build, version="2")
    assert len(builds) == 2 and (tmp_path / "tiny-x" / "weights").read_text() == "2"


def test_an_incomplete_family_directory_names_what_is_missing(tmp_path):
    import shutil

    shutil.copytree(resolve("tiny-flux"), tmp_path / "flux", ignore=shutil.ignore_patterns("transformer"))
    with pytest.raises(ValueError, match="not a complete diffusers FluxPipeline directory: missing transformer/"):
        load(str(tmp_path / "flux"))


def test_a_family_base_loads_from_s3(s3_bucket, tmp_path, monkeypatch):
    import boto3

    local = resolve("tiny-flux")
    s3 = boto3.client("s3")
    for f in local.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), s3_bucket, f"models/flux/{f.relative_to(local)}")
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path / "cache"))
    base = load(f"s3://{s3_bucket}/models/flux")
    assert base.family.name == "flux" and str(base.local_dir).startswith(str(tmp_path / "cache"))
    assert torch.equal(base.denoiser.proj_out.weight, base_of("flux").denoiser.proj_out.weight)


def test_sdxl_condition_of_the_wrong_size_is_a_clear_error():
    from model.families.sdxl import Union

    base = base_of("sdxl")
    latents, prompt, _ = batch(base)
    noisy, timesteps, _ = base.family.noise(base, latents)
    small = torch.rand(2, 3, 32, 32)
    for union, control in ((False, small), (True, Union(small, torch.tensor([0, 3])))):
        model = base.family.controlled(base, [base.family.new_controlnet(base, union=union)])
        with pytest.raises(ValueError, match=r"condition 0 has shape \(2, 3, 32, 32\); expected \(2, 3, 64, 64\)"):
            model(noisy, timesteps, prompt, [control])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_condition_latents_come_from_the_given_generator_not_the_global_rng(family):
    """SD3's and Flux's ControlNets read VAE latents of the condition, a posterior sample: it must come from the
    caller's generator (reproducible per run and rank), and leave torch's global RNG where it was."""
    base = base_of(family)
    conditions = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = base.family.control_inputs(base, conditions, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = base.family.control_inputs(base, conditions, torch.Generator().manual_seed(5))
    c = base.family.control_inputs(base, conditions, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", PRESETS)
def test_stored_text_tensors_complete_to_the_encoded_prompt(family):
    """Precompute stores only the text-derived tensors (text_keys); complete_prompt rebuilds the rest from the
    empty prompt encoded at the training size, giving exactly what encode_prompts gives."""
    base = base_of(family)
    fam = base.family
    with torch.no_grad():
        full = fam.encode_prompts(base, ["a red circle", "a blue square"], (64, 64))
        empty = fam.encode_prompts(base, [""], (64, 64))
    completed = fam.complete_prompt({k: full[k] for k in fam.text_keys}, empty)
    assert completed.keys() == full.keys()
    assert all(torch.equal(completed[k], full[k]) for k in full)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_rows_original_sizes_become_sdxl_micro_conditioning(family):
    """Annotated rows record each image's size before annotate scaled and centre-cropped it; SDXL's time ids
    (original h, w, crop top, left, target h, w) come from them, per row. SD has no size conditioning."""
    import numpy as np

    from pipelines.data.tensors import batch_tensors

    base = base_of(family)
    rows = {
        "image": np.zeros((3, 64, 64, 3), np.uint8),
        "condition": np.zeros((3, 64, 64, 3), np.uint8),
        "text": np.array(["a red circle"] * 3, dtype=object),
        "original_width": np.array([1024, 768, 64], np.int32),
        "original_height": np.array([768, 1024, 64], np.int32),
    }
    _, prompt, _ = batch_tensors(rows, base, "condition", None, torch.device("cpu"), {})
    without = {k: v for k, v in rows.items() if not k.startswith("original_")}
    _, plain, _ = batch_tensors(without, base, "condition", None, torch.device("cpu"), {})
    if family == "sd":
        assert prompt.keys() == plain.keys() and all(torch.equal(prompt[k], plain[k]) for k in prompt)
        return
    # 1024x768 scaled to 85x64: the centre square begins 128 px in, 11 px (10.67) of the scaled image.
    assert prompt["time_ids"].tolist() == [
        [768, 1024, 0, 11, 64, 64],
        [1024, 768, 11, 0, 64, 64],
        [64, 64, 0, 0, 64, 64],
    ]
    assert plain["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 3  # no sizes recorded: the training size
    assert torch.equal(prompt["prompt_embeds"], plain["prompt_embeds"])
