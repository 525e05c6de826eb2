"""The serving application over real HTTP: Ray Serve on 127.0.0.1, models from a real MLflow server.

One application is deployed for the whole module, built from deploy/serve_config.yaml (with test
models, limits and auth), and every test talks to it with plain HTTP requests.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from pipelines.common.images import decode_rgb, encode_png
from pipelines.data.synthetic import fill50k

CONFIG_YAML = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
TOKEN_ENV = "ZC_SERVE_TEST_TOKEN"
TOKEN = "test-token-5f1c"
MAIN, SECOND, RELOADING = "serve-main", "serve-second", "serve-reload"
MLSD, HED_GONE = "serve-mlsd", "serve-hed-gone"  # a stride-16 annotator; one whose weights are missing
STEPS = 3  # tiny model, few steps: the suite stays fast
MAIN_DEFAULTS = {"steps": 4, "guidance_scale": 7.5}  # recorded at registration; not the code's 20 / 9.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_b64(image: np.ndarray) -> str:
    return b64(encode_png(image))


def decode_answer(answer: requests.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    if answer.headers["content-type"].startswith("image/png"):
        return decode_rgb(answer.content)
    return decode_rgb(base64.b64decode(answer.json()["image"]))


@pytest.fixture(scope="module")
def samples():
    return fill50k(4, size=64, seed=3)


@pytest.fixture(scope="module")
def server(ray_session, registry, mlsd_weights, tmp_path_factory):
    """Deploy the app from serve_config.yaml; yields (base URL, config args)."""
    from ray import serve

    from annotators import create
    from tests.deploy.conftest import missing_weights_spec

    assert registry(MAIN, seed=1, inference=MAIN_DEFAULTS) == "1"
    registry(SECOND, seed=2)  # records no inference defaults: the code's apply
    registry(RELOADING, seed=3)
    registry(MLSD, seed=6, annotator=create("mlsd", weights_source=str(mlsd_weights)).spec())
    registry(HED_GONE, seed=7, annotator=missing_weights_spec(tmp_path_factory.mktemp("hed")))

    spec = yaml.safe_load(CONFIG_YAML.read_text())
    app_spec = spec["applications"][0]
    args = dict(app_spec["args"])
    args.update(
        models=[MAIN, SECOND, RELOADING, MLSD, HED_GONE],
        mlflow={"tracking_uri": registry.tracking_uri},
        auth_token_env=TOKEN_ENV,
        reload_interval_s=0.5,
        request_timeout_s=60,
        replicas={"num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 32},
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        limits={
            "max_image_bytes": 48_000,
            "max_image_pixels": 256 * 256,
            "max_size": 256,
            "max_steps": 50,
            "max_request_bytes": 1_000_000,
        },
    )
    os.environ[TOKEN_ENV] = TOKEN
    module, attr = app_spec["import_path"].split(":")
    application = getattr(importlib.import_module(module), attr)(args)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application, name=app_spec["name"], route_prefix=app_spec["route_prefix"])
        yield f"http://127.0.0.1:{port}", args
    finally:
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def post(server, body: dict, token: str | None = TOKEN, **headers) -> requests.Response:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{server[0]}/v1/generate", json=body, headers=headers, timeout=60)


def request_for(sample, seed: int = 0, **extra) -> dict:
    body = {"prompt": sample.text, "controls": [{"image": png_b64(sample.condition)}], "seed": seed, "steps": STEPS}
    body.update(extra)
    return body


def offline(models: list[str], prompts, conditions, scheduler=None, **kwargs) -> np.ndarray:
    """What the offline pipeline gives on the same registered artifacts (same thread count as the replica).

    ``scheduler``: a diffusers scheduler class to use instead of the pipeline's own DDIM."""
    import torch
    from diffusers import DDIMScheduler

    from model.inference import generate, load_pipeline
    from model.registry import resolve_model

    resolved = [resolve_model(name) for name in models]
    pipe = load_pipeline(resolved[0].base_model, [r.controlnet_dir for r in resolved])
    assert isinstance(pipe.scheduler, DDIMScheduler)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums depend on the thread count; the replica runs one thread
    try:
        return generate(pipe, prompts, conditions, **kwargs)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------


def test_config_file_is_a_valid_local_serve_config():
    from ray.serve.schema import ServeDeploySchema

    spec = yaml.safe_load(CONFIG_YAML.read_text())
    ServeDeploySchema.model_validate(spec)
    assert spec["http_options"]["host"] == "127.0.0.1"
    from deploy.app import build_app
    from deploy.config import validate_config

    module, attr = spec["applications"][0]["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    validate_config(spec["applications"][0]["args"])  # every arg is a ServeConfig field


def test_health_and_models(server):
    health = requests.get(f"{server[0]}/healthz", timeout=10)  # no token needed: load balancer probes
    assert health.status_code == 200
    body = health.json()
    assert body["models"] == {MAIN: "1", SECOND: "1", RELOADING: "1", MLSD: "1", HED_GONE: "1"}
    # Everything serves, but an offered annotator could not be loaded: the probe says so.
    assert body["status"] == "degraded" and list(body["problems"]) == ["annotator hed"]
    assert "ControlNetHED.pth" in body["problems"]["annotator hed"]

    listed = requests.get(f"{server[0]}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert listed.status_code == 200
    models = {m["name"]: m for m in listed.json()["models"]}
    assert set(models) == {MAIN, SECOND, RELOADING, MLSD, HED_GONE}
    main = models[MAIN]
    assert (main["version"], main["alias"], main["default"], main["own_unet"]) == ("1", "champion", True, False)
    assert main["annotator"]["name"] == "canny"
    assert Path(main["base_model"]).is_dir()
    assert main["inference"] == MAIN_DEFAULTS


def test_generate_matches_offline_pipeline(server, samples):
    sample = samples[0]
    first = post(server, request_for(sample, seed=7))
    body = first.json()
    assert (body["seed"], body["width"], body["height"], body["steps"]) == (7, 64, 64, STEPS)
    assert body["guidance_scale"] == MAIN_DEFAULTS["guidance_scale"]  # the model's recorded default
    assert body["models"] == [{"name": MAIN, "version": "1"}]
    served = decode_answer(first)

    guidance = MAIN_DEFAULTS["guidance_scale"]
    expected = offline([MAIN], [sample.text], sample.condition[None], seed=7, steps=STEPS, guidance_scale=guidance)[0]
    np.testing.assert_array_equal(served, expected)
    # Same seed and inputs: the same image again, also as image/png; another seed: another image.
    np.testing.assert_array_equal(decode_answer(post(server, request_for(sample, seed=7))), served)
    as_png = post(server, request_for(sample, seed=7), Accept="image/png")
    assert as_png.headers["content-type"] == "image/png" and as_png.headers["x-seed"] == "7"
    np.testing.assert_array_equal(decode_answer(as_png), served)
    np.testing.assert_array_equal(
        decode_answer(post(server, request_for(sample, seed=7, response_format="png"))), served
    )
    assert not np.array_equal(decode_answer(post(server, request_for(sample, seed=8))), served)


def test_source_image_is_annotated_on_the_server(server, samples):
    from annotators import create

    sample = samples[1]
    control = {"source_image": b64(encode_png(sample.image)), "annotator": "canny"}
    named = decode_answer(post(server, {"prompt": sample.text, "controls": [control], "seed": 3, "steps": STEPS}))
    edges = create("canny")(sample.image[None])
    expected = offline([MAIN], [sample.text], edges, seed=3, steps=STEPS, guidance_scale=7.5)[0]
    np.testing.assert_array_equal(named, expected)
    # No annotator named: the model's own (recorded at registration) is used.
    del control["annotator"]
    default = decode_answer(post(server, {"prompt": sample.text, "controls": [control], "seed": 3, "steps": STEPS}))
    np.testing.assert_array_equal(default, named)


def test_defaults_are_the_models_recorded_ones_else_ddim_20_steps_cfg_9(server, samples):
    from diffusers import EulerDiscreteScheduler

    sample = samples[2]
    bare = {"prompt": sample.text, "seed": 9, "controls": [{"image": png_b64(sample.condition)}]}
    recorded = post(server, bare).json()
    assert (recorded["steps"], recorded["guidance_scale"]) == (MAIN_DEFAULTS["steps"], MAIN_DEFAULTS["guidance_scale"])

    bare["controls"][0]["model"] = SECOND  # records no defaults: the code's own (the paper's)
    answer = post(server, bare)
    assert (answer.json()["steps"], answer.json()["guidance_scale"]) == (20, 9.0)
    served = decode_answer(answer)
    ddim = offline([SECOND], [sample.text], sample.condition[None], seed=9)[0]  # generate's defaults
    np.testing.assert_array_equal(served, ddim)
    # The comparison sees the sampler: the same call with another scheduler gives another image.
    euler = offline([SECOND], [sample.text], sample.condition[None], seed=9, scheduler=EulerDiscreteScheduler)[0]
    assert not np.array_equal(served, euler)


def test_server_side_annotator_is_the_one_training_recorded(server, samples, mlsd_weights):
    from annotators import create

    sample = samples[3]
    control = {"model": MLSD, "source_image": b64(encode_png(sample.image))}
    answer = post(server, {"prompt": sample.text, "controls": [control], "seed": 4, "steps": STEPS})
    lines = create("mlsd", weights_source=str(mlsd_weights))(sample.image[None])  # the recorded weights
    expected = offline([MLSD], [sample.text], np.repeat(lines, 3, axis=-1), seed=4, steps=STEPS)[0]
    np.testing.assert_array_equal(decode_answer(answer), expected)


def test_several_controls_compose_registered_controlnets(server, samples):
    a, b = samples[0], samples[2]
    body = {
        "prompt": "two circles",
        "seed": 5,
        "steps": STEPS,
        "controls": [
            {"model": MAIN, "image": png_b64(a.condition), "scale": 1.0},
            {"model": SECOND, "image": png_b64(b.condition), "scale": 0.5},
        ],
    }
    answer = post(server, body)
    assert answer.json()["models"] == [{"name": MAIN, "version": "1"}, {"name": SECOND, "version": "1"}]
    expected = offline(
        [MAIN, SECOND],
        ["two circles"],
        [a.condition[None], b.condition[None]],
        seed=5,
        steps=STEPS,
        conditioning_scale=[1.0, 0.5],
        guidance_scale=MAIN_DEFAULTS["guidance_scale"],  # the first model's
    )[0]
    np.testing.assert_array_equal(decode_answer(answer), expected)


def _noise_png(size: int) -> str:
    return png_b64(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _bad_requests():
    ok_image = png_b64(np.zeros((64, 64, 3), np.uint8))
    good = {"prompt": "x", "controls": [{"image": ok_image}], "steps": 2}

    def with_(**changes):
        return {**good, **changes}

    def control(**changes):
        return with_(controls=[{**good["controls"][0], **changes}])

    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, format="JPEG")
    return [
        ("invalid base64", control(image="not base64!!"), 400, "controls[0].image"),
        ("not an image", control(image=b64(b"hello, this is text")), 400, "controls[0].image"),
        ("truncated image", control(image=b64(jpeg.getvalue()[:200])), 400, "controls[0].image"),
        ("too many bytes", control(image=_noise_png(130)), 413, "controls[0].image"),
        ("too many pixels", control(image=png_b64(np.zeros((300, 300, 3), np.uint8))), 413, "controls[0].image"),
        ("steps zero", with_(steps=0), 422, "steps"),
        ("steps too many", with_(steps=500), 422, "steps"),
        ("steps not a number", with_(steps="many"), 422, "steps"),
        ("width not a multiple of 8", with_(width=100), 422, "width"),
        ("height too large", with_(height=4096), 422, "height"),
        ("width too small", with_(width=8), 422, "width"),
        ("guidance negative", with_(guidance_scale=-1), 422, "guidance_scale"),
        ("scale too large", control(scale=99), 422, "controls[0].scale"),
        (
            "unknown annotator",
            control(image=None, source_image=ok_image, annotator="nope"),
            422,
            "controls[0].annotator",
        ),
        ("annotator with a condition image", control(annotator="canny"), 422, "controls[0].annotator"),
        (
            "annotator not offered",
            control(image=None, source_image=ok_image, annotator="lineart_standard"),
            422,
            "controls[0].annotator",
            "annotator 'lineart_standard'",
        ),
        (
            "annotator weights missing",
            control(model=HED_GONE, image=None, source_image=ok_image),
            503,
            "controls[0].annotator",
            "annotator 'hed'",
        ),
        (
            "size not a multiple of the annotator's stride",
            {**control(model=MLSD, image=None, source_image=ok_image), "width": 72},
            422,
            "width",
            "annotator 'mlsd'",
        ),
        ("unknown model", control(model="no-such-model"), 422, "controls[0].model"),
        ("no image at all", control(image=None), 422, "controls[0].image"),
        ("no controls", with_(controls=[]), 422, "controls"),
        ("too many controls", with_(controls=good["controls"] * 5), 422, "controls"),
        ("missing prompt", {"controls": good["controls"]}, 422, "prompt"),
        ("unknown field", with_(sampler="euler"), 422, "sampler"),
        ("negative seed", with_(seed=-1), 422, "seed"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_requests_get_a_4xx_naming_the_field(server, case):
    _, body, status, field = case[:4]
    answer = post(server, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and answer.json()["error"]
    for named in case[4:]:  # what the message must name
        assert named in answer.json()["error"], answer.json()


def test_malformed_bodies_and_server_still_answers(server, samples):
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"{server[0]}/v1/generate"
    not_json = requests.post(url, data=b"{not json", headers=headers, timeout=30)
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]
    huge = requests.post(url, data=b"x" * 1_100_000, headers=headers, timeout=30)
    assert huge.status_code == 413
    # After every bad request above the server is still up and still generates.
    assert requests.get(f"{server[0]}/healthz", timeout=10).status_code == 200
    assert post(server, request_for(samples[0], seed=1)).status_code == 200


def test_auth_needs_the_bearer_token(server, samples):
    body = request_for(samples[0], seed=1)
    missing = post(server, body, token=None)
    assert missing.status_code == 401 and missing.json()["field"] == "Authorization"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert post(server, body, token="wrong").status_code == 401
    assert requests.get(f"{server[0]}/v1/models", timeout=10).status_code == 401
    assert post(server, body).status_code == 200


def test_fifty_concurrent_requests_are_batched_without_errors(server, samples):
    bodies = [request_for(samples[i % len(samples)], seed=100 + i, steps=2) for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    assert [a.status_code for a in answers] == [200] * 50
    assert [a.json()["seed"] for a in answers] == [100 + i for i in range(50)]
    sizes = [a.json()["batch_size"] for a in answers]
    assert max(sizes) > 1, sizes  # requests did share pipeline calls
    # Batching gives each request its own seed: the same image as alone, up to float rounding (CPU
    # kernels sum in a batch-size-dependent order, so a pixel may differ by one level).
    for i in (0, 17, 49):
        alone = decode_answer(post(server, bodies[i]))
        assert np.abs(decode_answer(answers[i]).astype(int) - alone).max() <= 1


def test_alias_move_is_served_without_dropping_requests(server, registry, samples):
    import mlflow

    sample = samples[0]
    body = request_for(sample, seed=11, steps=2)
    body["controls"][0]["model"] = RELOADING
    before = decode_answer(post(server, body))

    statuses, versions, stop = [], [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            answer = post(server, body)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                versions.append(answer.json()["models"][0]["version"])

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        new_version = registry(RELOADING, seed=4, champion=False)
        time.sleep(0.5)  # let some requests run on the old version first
        mlflow.MlflowClient().set_registered_model_alias(RELOADING, "champion", new_version)
        deadline = time.time() + 60
        while time.time() < deadline:
            health = requests.get(f"{server[0]}/healthz", timeout=10).json()
            if health["models"][RELOADING] == new_version:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the new version was not served within 60 s of the alias move")
        time.sleep(0.5)  # a few requests on the new version
    finally:
        stop.set()
        worker.join(timeout=60)

    assert statuses and all(s == 200 for s in statuses), statuses
    assert versions[0] == "1" and versions[-1] == new_version
    assert versions == sorted(versions, key=int)  # old until the swap, new after it
    after = post(server, body)
    assert after.json()["models"] == [{"name": RELOADING, "version": new_version}]
    assert not np.array_equal(decode_answer(after), before)
    assert requests.get(f"{server[0]}/healthz", timeout=10).json()["models"][MAIN] == "1"  # others untouched


def test_timed_out_requests_free_the_model_for_the_next_request(server):
    """A burst of requests that time out must not keep the one pipeline thread busy: the next request
    is served, instead of waiting behind abandoned work until it times out as well."""
    from ray import serve

    from deploy.app import build_app

    args = {
        **server[1],
        "models": [SECOND],
        "auth_token_env": None,
        "request_timeout_s": 5,
        "reload_interval_s": 0,
        "limits": {"max_size": 512, "max_steps": 100},
    }
    serve.run(build_app(args), name="timeouts", route_prefix="/timeouts")
    url = f"{server[0]}/timeouts/v1/generate"
    try:
        slow = {"prompt": "x", "controls": [{"image": png_b64(np.zeros((512, 512, 3), np.uint8))}], "steps": 100}
        with ThreadPoolExecutor(max_workers=8) as pool:
            burst = list(pool.map(lambda i: requests.post(url, json={**slow, "seed": i}, timeout=120), range(8)))
        assert [a.status_code for a in burst] == [504] * 8, [a.text for a in burst]
        assert burst[0].json() == {"error": "generation took longer than 5.0s", "field": None}

        quick = {"prompt": "x", "controls": [{"image": png_b64(np.zeros((64, 64, 3), np.uint8))}], "steps": 2}
        answer = requests.post(url, json=quick, timeout=120)
        assert answer.status_code == 200, answer.text
    finally:
        serve.delete("timeouts")
