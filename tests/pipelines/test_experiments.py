"""bench/bench_experiments.py, reduced to tiny sizes: the experiments' code path runs end to end (training
through run_train, scoring, the JSON, the MLflow run with its plot) and its numbers are computed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_experiments.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_experiments", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reduced_experiments_compute_their_report(tmp_path, ray_session, tiny_base_dir):
    import mlflow

    bench = load_bench()
    settings = bench.Settings(
        base="tiny", sizes=(8, 16), steps=2, batch_size=2, heldout=2, sampling_steps=2, curve_every=1, compose_size=16
    )
    report = bench.run_experiments(settings, tmp_path)
    run_id = bench.log_to_mlflow(report, tmp_path)

    assert report["resolution"] == 64
    sizes = report["dataset_size"]
    assert [r["images"] for r in sizes] == [8, 16]
    assert [r["epochs"] for r in sizes] == [0.5, 0.2]  # 2 steps x batch 2 over 8 and 16 images (rounded)
    for r in sizes:
        for value in (r["edge_f1"], r["mask_iou"], *r["no_control"].values()):
            assert 0.0 <= value <= 1.0
    composed = {tuple(r["controlnets"]): r for r in report["composition"]["results"]}
    assert set(composed) == {(), ("edges",), ("mask",), ("edges", "mask")}
    # Both ControlNets at scale 0 add nothing: the composed pipeline's "none" is the base alone, the same
    # images (same prompts and seeds) as the no-control scores of the size runs.
    assert composed[()]["edge_f1"] == sizes[-1]["no_control"]["edge_f1"]
    assert composed[()]["mask_iou"] == sizes[-1]["no_control"]["mask_iou"]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Every ControlNet trained on its set's precomputed latents (encoded once, not in every step).
    trained = client.search_runs([client.get_experiment_by_name("zeroconv-experiments").experiment_id])
    data = {run.info.run_name: run.data.params["data"] for run in trained if run.info.run_id != run_id}
    assert data == {
        "size-8": str(tmp_path / "data-8-precomputed"),
        "size-16": str(tmp_path / "data-16-precomputed"),
        "compose-mask": str(tmp_path / "data-16-precomputed"),
    }
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"experiments.json", "experiments.png"} <= artifacts
    history = client.get_metric_history(run_id, "size/edge_f1")
    assert sorted(m.step for m in history) == [8, 16]
