"""zeroconv's tiny base model loads the way diffusers' own ControlNet training script loads a base
(examples/controlnet/train_controlnet.py), in a Python where zeroconv cannot be imported."""

from __future__ import annotations

import torch

# The script's loading contract, step by step (tokenizer, text-encoder class from the config's
# ``architectures``, VAE, UNet, noise scheduler, ControlNet initialised from the UNet).
LOAD_LIKE_TRAIN_CONTROLNET = """
import importlib.util, json, sys
import torch, transformers
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, PretrainedConfig
assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("model") is None
base = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", use_fast=False)
text_encoder_class = PretrainedConfig.from_pretrained(base, subfolder="text_encoder").architectures[0]
text_encoder = getattr(transformers, text_encoder_class).from_pretrained(base, subfolder="text_encoder")
vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
controlnet = ControlNetModel.from_unet(unet)
ids = tokenizer(["a red circle"], max_length=tokenizer.model_max_length, padding="max_length",
                truncation=True, return_tensors="pt").input_ids
with torch.no_grad():
    hidden = text_encoder(ids)[0]
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    down, mid = controlnet(latents, 10, encoder_hidden_states=hidden, controlnet_cond=torch.zeros(1, 3, 64, 64),
                           return_dict=False)
print(json.dumps({"class": text_encoder_class, "ids": ids[0, :5].tolist(), "hidden": hidden.flatten().tolist(),
                  "latent_shape": list(latents.shape), "residuals": len(down),
                  "prediction_type": scheduler.config.prediction_type}))
"""


def test_diffusers_train_controlnet_script_contract_loads_the_tiny_base(tiny_base, without_zeroconv, tmp_path):
    result = without_zeroconv.run_json(LOAD_LIKE_TRAIN_CONTROLNET, tiny_base.local_dir, cwd=tmp_path)
    # the one text-encoder class the script accepts for SD 1.x
    assert result["class"] == "CLIPTextModel"
    assert result["ids"] == [49406, 320, 736, 7117, 49407]
    # the trained weights were loaded, not fresh ones: same embeddings as zeroconv computes
    expected = tiny_base.family.encode_prompts(tiny_base, ["a red circle"], (64, 64))["prompt_embeds"].flatten()
    assert torch.allclose(torch.tensor(result["hidden"]), expected, atol=1e-5)
    assert result["latent_shape"] == [1, 4, 8, 8] and result["residuals"] == 4
    assert result["prediction_type"] == "epsilon"
