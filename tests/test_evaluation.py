"""One evaluator: ns-eval (nerfstudio's ComputePSNR over our pipeline) and evolsplat-infer score the
same held-out views of the same checkpoint identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny_run import tiny_checkpoint

METRICS = ("psnr", "ssim", "depth_abs_rel", "depth_rmse")


@pytest.fixture(scope="module")
def run_config(tiny_dataset, tmp_path_factory) -> Path:
    return tiny_checkpoint(tiny_dataset, tmp_path_factory)


def test_ns_eval_and_infer_agree(run_config, tiny_dataset, tmp_path):
    from nerfstudio.scripts.eval import ComputePSNR

    from evolsplat_ns.cli.infer import main as infer
    from evolsplat_ns.inference.loading import load_pipeline

    ns_eval_json = tmp_path / "ns_eval.json"
    ComputePSNR(load_config=run_config, output_path=ns_eval_json).main()
    ns_eval = json.loads(ns_eval_json.read_text())["results"]

    # The run's eval scene, given to evolsplat-infer as new data: the same held-out frames,
    # segments and sources (every scene of --data is an eval scene with the run's interval).
    _, pipeline, _ = load_pipeline(run_config)
    dataset = pipeline.datamanager.dataset
    eval_scenes = [dataset.scenes[i].name for i in sorted(dataset.eval_scene_ids)]
    dataset.close()
    new = tmp_path / "eval_scenes"
    for name in eval_scenes:
        shutil.copytree(tiny_dataset / name, new / name)
    report = infer(["--load-config", str(run_config), "--data", str(new), "--output-dir", str(tmp_path / "infer"),
                    "--video-frames", "0", "--no-progress"])

    assert report["num_views"] == ns_eval["num_views"] > 0
    compared = [k for k in METRICS if k in ns_eval]
    assert {"psnr", "ssim"} <= set(compared)
    for key in compared:
        assert report[key] == pytest.approx(ns_eval[key], rel=1e-6, abs=1e-9), key


def test_ns_eval_writes_one_image_per_output(run_config, tmp_path):
    """ns-eval --render-output-path: rgb, gt-rgb, depth and accumulation per held-out view (as
    ns-render dataset lays them out); composites only when asked; rgb equals the scored render."""
    import numpy as np
    from PIL import Image
    from nerfstudio.scripts.eval import ComputePSNR

    from evolsplat_ns.engine.evaluation import VIEW_OUTPUTS

    out = tmp_path / "renders"
    ComputePSNR(load_config=run_config, output_path=tmp_path / "m.json", render_output_path=out).main()
    num_views = json.loads((tmp_path / "m.json").read_text())["results"]["num_views"]
    assert sorted(p.name for p in out.iterdir()) == sorted(VIEW_OUTPUTS)
    names = {o: sorted(p.name for p in (out / o).glob("*.png")) for o in VIEW_OUTPUTS}
    assert all(len(n) == num_views and n == names["rgb"] for n in names.values())
    rgb = np.asarray(Image.open(out / "rgb" / names["rgb"][0]))
    gt = np.asarray(Image.open(out / "gt-rgb" / names["rgb"][0]))
    assert rgb.shape == gt.shape and rgb.shape[2] == 3 and np.abs(rgb.astype(int) - gt).mean() > 0
