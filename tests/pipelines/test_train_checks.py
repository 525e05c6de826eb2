"""`zeroconv train` refuses what cannot work, clearly and before any worker starts (no Ray here)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.common.config import ConfigError, MLflowConfig, load_config
from pipelines.data.synthetic import fill50k_table
from pipelines.train import TrainConfig, inspect_dataset, resolve_config, run_train


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*does not exist"):
        run_train(TrainConfig(data=str(tmp_path / "does-not-exist"), work_dir=str(tmp_path)))


def test_missing_condition_column_lists_the_columns(tmp_path, fill50k_parquet):
    with pytest.raises(ValueError, match=r"no column 'cond_canny'.*columns are id, image, conditioning_image, text"):
        run_train(TrainConfig(data=str(fill50k_parquet), condition_column="cond_canny", work_dir=str(tmp_path)))


def test_bad_policy_names_the_choices():
    with pytest.raises(
        ConfigError, match=r"policy: 'unlock_everything' is not allowed.*locked.*unlock_decoder.*unlock_full"
    ):
        load_config(TrainConfig, overrides=["policy=unlock_everything"])


def test_pretrain_on_a_family_without_it_fails_before_training(tmp_path, fill50k_parquet):
    """policy=pretrain (and SD's objective options) exist only for some families: a one-line error from the
    driver, before Ray or MLflow start, not a failure in every worker (retried max_failures times)."""
    config = TrainConfig(
        data=str(fill50k_parquet), work_dir=str(tmp_path), policy="pretrain", base_model={"source": "tiny-sd3"}
    )
    with pytest.raises(ValueError, match="policy=pretrain is not supported for sd3 base models"):
        run_train(config)
    config = TrainConfig(
        data=str(fill50k_parquet), work_dir=str(tmp_path), snr_gamma=5.0, base_model={"source": "tiny-flux"}
    )
    with pytest.raises(ValueError, match="snr_gamma is not supported for flux base models"):
        run_train(config)
    assert not (tmp_path / "train").exists()  # nothing started


def test_dead_tracking_server_fails_before_training(tmp_path, fill50k_parquet):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = TrainConfig(data=str(fill50k_parquet), work_dir=str(tmp_path), mlflow=MLflowConfig(tracking_uri=dead))
    with pytest.raises(ValueError, match=f"MLflow tracking server {dead} is not reachable"):
        run_train(config)
    assert not (tmp_path / "train").exists()  # nothing started


def test_fp16_on_cpu_is_refused_and_auto_precision_resolves(tmp_path):
    config = TrainConfig(work_dir=str(tmp_path), precision="fp16")
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        resolve_config(config, has_gpu_nodes=False)
    assert resolve_config(config.model_copy(update={"precision": "auto"}), has_gpu_nodes=False).precision == "fp32"
    gpu = resolve_config(config.model_copy(update={"precision": "auto", "num_workers": 2}), has_gpu_nodes=True)
    assert (gpu.precision, gpu.use_gpu) == ("bf16", True)


def test_gpu_workers_are_requested_not_sized_from_the_cluster_now(tmp_path):
    """An autoscaling cluster may have no GPU node yet: use_gpu=true num_workers=8 resolves (Ray Train then
    waits for the nodes) instead of failing on a snapshot of the cluster."""
    from pipelines.train import worker_resources

    config = TrainConfig(work_dir=str(tmp_path), use_gpu=True, num_workers=8, ray={"resources": {"train_gpu": 1}})
    resolved = resolve_config(config, has_gpu_nodes=False)
    assert (resolved.use_gpu, resolved.num_workers, resolved.precision) == (True, 8, "bf16")
    assert worker_resources(resolved) == {"CPU": 1.0, "GPU": 1.0, "train_gpu": 1}


def test_min_workers_makes_the_worker_count_elastic(tmp_path):
    """min_workers: Ray Train V2's elastic (min, max) worker count; without it, exactly num_workers."""
    from pipelines.train import scaling_config

    resources = {"CPU": 1.0, "train_gpu": 1}
    elastic = scaling_config(TrainConfig(work_dir=str(tmp_path), num_workers=8, min_workers=2), resources)
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (2, 8)
    assert elastic.resources_per_worker == resources
    fixed = scaling_config(TrainConfig(work_dir=str(tmp_path), num_workers=8), resources)
    assert not fixed.elasticity_enabled and fixed.num_workers == 8
    # Each step consumes batch x accum x the workers of the group running now, not num_workers.
    assert TrainConfig(batch_size=2, grad_accum=3, num_workers=8, min_workers=2).effective_batch(2) == 12
    with pytest.raises(ConfigError, match="min_workers=4 is more than num_workers=2"):
        load_config(TrainConfig, overrides=["num_workers=2", "min_workers=4"])


def test_a_request_no_node_can_hold_is_refused_on_a_fixed_cluster():
    from pipelines.train import check_fits_fixed_cluster

    nodes = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 1.0, "GPU": 1.0}]
    check_fits_fixed_cluster({"CPU": 1.0}, 3, nodes)
    check_fits_fixed_cluster({"CPU": 1.0, "GPU": 1.0}, 1, nodes)
    with pytest.raises(ConfigError, match=r"needs train_gpu=1 \(the largest node has train_gpu=0\)"):
        check_fits_fixed_cluster({"CPU": 1.0, "train_gpu": 1.0}, 1, nodes)
    with pytest.raises(ConfigError, match=r"can hold 1 training worker.*not num_workers=2"):
        check_fits_fixed_cluster({"CPU": 1.0, "GPU": 1.0}, 2, nodes)


def test_resolved_config_fills_storage_and_tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resolved = resolve_config(TrainConfig(work_dir=str(tmp_path)), has_gpu_nodes=False)
    assert resolved.storage_path == f"{tmp_path}/train"
    assert resolved.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match="set mlflow.tracking_uri"):
        resolve_config(TrainConfig(work_dir="s3://bucket/runs"), has_gpu_nodes=False)


def test_unfinished_annotation_is_refused_unless_allowed(tmp_path):
    from pipelines.data.schema import ANNOTATED_FORMAT, MANIFEST
    from pipelines.train import check_annotation_finished

    pq.write_table(fill50k_table(4, size=64), tmp_path / "part-0.parquet")
    manifest = {"format": ANNOTATED_FORMAT, "status": "incomplete", "shards": {"total": 3, "done": 1}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    config = TrainConfig(data=str(tmp_path), batch_size=1, work_dir=str(tmp_path / "work"))
    with pytest.raises(ValueError, match=r"not finished: its annotate manifest says 'incomplete' \(1 of 3 shards\)"):
        run_train(config)  # refused before Ray or MLflow start
    assert not (tmp_path / "work").exists()
    check_annotation_finished(config.model_copy(update={"allow_incomplete_data": True}))
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "status": "complete"}))
    check_annotation_finished(config)


def test_dataset_checks_sizes_rows_and_reads_the_annotator_spec(tmp_path):
    table = fill50k_table(6, size=64)
    spec = {"name": "canny", "version": "1", "params": {"low_threshold": 100}}
    field = table.schema.field("conditioning_image").with_metadata({b"zeroconv.annotator": json.dumps(spec).encode()})
    table = table.cast(table.schema.set(table.schema.get_field_index("conditioning_image"), field))
    pq.write_table(table, tmp_path / "part-0.parquet")
    info = inspect_dataset(TrainConfig(data=str(tmp_path), num_validation=2, batch_size=2, num_workers=3))
    assert (info.rows, info.resolution, info.annotator) == (6, (64, 64), spec)
    assert info.validation["text"] == table.column("text").to_pylist()[:2]

    with pytest.raises(ValueError, match="has 6 rows; one batch across 4 worker"):
        inspect_dataset(TrainConfig(data=str(tmp_path), batch_size=2, num_workers=4))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(fill50k_table(2, size=64), mixed / "a.parquet")
    pq.write_table(fill50k_table(2, size=128), mixed / "b.parquet")
    with pytest.raises(ValueError, match=r"mixes image sizes \[\(64, 64\), \(128, 128\)\]"):
        inspect_dataset(TrainConfig(data=str(mixed), batch_size=1))


def test_decode_and_tensors_match_the_model_conventions():
    from pipelines.data.tensors import decode_batch, to_tensors

    table = fill50k_table(3, size=64)
    batch = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("image", "conditioning_image", "text")}
    decoded = decode_batch(batch, "conditioning_image")
    assert decoded["image"].shape == decoded["condition"].shape == (3, 64, 64, 3)
    images, conditions, prompts = to_tensors(decoded, torch.device("cpu"))
    assert images.shape == conditions.shape == (3, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1 and conditions.min() == 0 and conditions.max() == 1
    assert set(conditions.unique().tolist()) == {0.0, 1.0}  # the outline is binary, one channel repeated
    assert prompts == table.column("text").to_pylist()


def test_ema_tracks_the_weights_with_warmup():
    from pipelines.train_loop import EMA

    weight = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    ema = EMA([("w", weight), ("frozen", frozen)], decay=0.99)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update()  # warmup: decay = min(0.99, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    weights = ema.full_weights()
    assert list(weights) == ["w"] and torch.equal(weights["w"], ema.shadow[0])
    fresh = EMA([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.99)
    fresh.load_full_weights(weights, ema.updates)
    assert fresh.updates == 1 and torch.equal(fresh.shadow[0], ema.shadow[0])


def test_image_grid_puts_condition_beside_generated():
    from pipelines.common.tracking import image_grid

    conditions = np.zeros((2, 4, 4, 3), np.uint8)
    images = np.full((2, 4, 4, 3), 255, np.uint8)
    grid = image_grid(conditions, images)
    assert grid.shape == (8, 8, 3)
    assert (grid[:, :4] == 0).all() and (grid[:, 4:] == 255).all()


def test_precomputed_dataset_must_match_the_base_model(tmp_path):
    from pipelines.data.schema import MANIFEST
    from pipelines.data.schema import PRECOMPUTED_FORMAT as FORMAT_VERSION

    table = fill50k_table(4, size=64).drop_columns(["image"])
    for name in ("latent_mean", "latent_std", "text_embedding"):
        table = table.append_column(name, pa.array([[0.0]] * 4))
    pq.write_table(table, tmp_path / "part-0.parquet")
    manifest = {
        "format": FORMAT_VERSION,
        "status": "complete",
        "job": {"base_model": "some/other-model"},
        "scaling_factor": 0.18215,
        "tensors": {
            "latent_mean": {"shape": [4, 8, 8]},
            "latent_std": {"shape": [4, 8, 8]},
            "text_embedding": {"shape": [77, 32]},
        },
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="precomputed with base model 'some/other-model', not 'tiny'"):
        inspect_dataset(TrainConfig(data=str(tmp_path), batch_size=1))
    info = inspect_dataset(TrainConfig(data=str(tmp_path), batch_size=1, base_model={"source": "some/other-model"}))
    assert info.scaling_factor == 0.18215
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(ValueError, match="no complete precompute manifest"):
        inspect_dataset(TrainConfig(data=str(tmp_path), batch_size=1))


def test_a_root_of_precomputed_batches_is_checked_batch_by_batch(tmp_path):
    """The pipeline's layout: <root>/<batch>/ per batch, each with its own precompute manifest."""
    from pipelines.data.schema import MANIFEST, PRECOMPUTED_FORMAT

    table = fill50k_table(4, size=64).drop_columns(["image"])
    for name in ("latent_mean", "latent_std", "text_embedding"):
        table = table.append_column(name, pa.array([[0.0]] * 4))
    manifest = {"format": PRECOMPUTED_FORMAT, "status": "complete", "job": {"base_model": "tiny"}}
    for batch, scaling_factor in (("2026-11-01", 0.5), ("2026-11-02", 0.5)):
        (tmp_path / batch).mkdir()
        pq.write_table(table, tmp_path / batch / "train-00000-of-00001.parquet")
        (tmp_path / batch / MANIFEST).write_text(json.dumps({**manifest, "scaling_factor": scaling_factor}))
    config = TrainConfig(data=str(tmp_path), batch_size=1)
    assert inspect_dataset(config).scaling_factor == 0.5
    assert inspect_dataset(config).rows == 8  # both batches

    second = tmp_path / "2026-11-02" / MANIFEST
    second.write_text(json.dumps({**manifest, "job": {"base_model": "other"}, "scaling_factor": 0.5}))
    with pytest.raises(ValueError, match=r"2026-11-02' was precomputed with base model 'other', not 'tiny'"):
        inspect_dataset(config)
    second.unlink()  # a batch whose precompute never finished
    with pytest.raises(ValueError, match=r"2026-11-02' has precomputed tensor columns but no complete"):
        inspect_dataset(config)


def test_base_model_under_home_is_recorded_with_home_expanded(tmp_path, monkeypatch):
    from pipelines.train import recorded_base_model

    (tmp_path / "home" / "sd15").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert recorded_base_model("~/sd15") == str(tmp_path / "home" / "sd15")
    assert recorded_base_model("tiny") == "tiny" and recorded_base_model("s3://b/m") == "s3://b/m"
