"""3DGS PLY export: the PLY reader/writer, the 3DGS layout, and evolsplat-export on a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evolsplat_ns.export.ply import PlyError, read_ply, write_ply
from evolsplat_ns.export.splat import from_splat_array, load_splat, save_splat, to_splat_array
from evolsplat_ns.model.node import GaussianParams
from tiny_run import tiny_checkpoint


def random_gaussians(n: int, sh_degree: int = 1, seed: int = 0) -> GaussianParams:
    g = torch.Generator().manual_seed(seed)
    quats = torch.randn(n, 4, generator=g)
    return GaussianParams(
        means=torch.randn(n, 3, generator=g) * 10,
        quats=quats / quats.norm(dim=-1, keepdim=True),
        scales=torch.rand(n, 3, generator=g) * 0.5 + 1e-3,
        opacities=torch.rand(n, generator=g) * 0.98 + 0.01,
        sh=torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g),
    )


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_splat_round_trip(tmp_path, sh_degree):
    g = random_gaussians(257, sh_degree)
    save_splat(tmp_path / "s.ply", g, comments=["hello"])
    back, raw, comments = load_splat(tmp_path / "s.ply")
    assert "hello" in comments and len(raw) == 257
    assert len(raw.dtype.names) == 3 + 3 + 3 + 3 * ((sh_degree + 1) ** 2 - 1) + 1 + 3 + 4
    for name in ("means", "quats", "scales", "opacities", "sh"):
        torch.testing.assert_close(getattr(back, name), getattr(g, name), rtol=1e-5, atol=1e-5)


def test_inria_sh_order():
    """f_rest holds each colour channel's coefficients contiguously (red's first)."""
    g = random_gaussians(2, sh_degree=1)
    raw = to_splat_array(g)
    assert raw["f_rest_0"][0] == pytest.approx(g.sh[0, 1, 0].item())
    assert raw["f_rest_1"][0] == pytest.approx(g.sh[0, 2, 0].item())
    assert raw["f_rest_3"][0] == pytest.approx(g.sh[0, 1, 1].item())
    assert raw["opacity"][0] == pytest.approx(torch.logit(g.opacities[0]).item(), rel=1e-5)


def test_opaque_gaussians_get_finite_logits():
    g = random_gaussians(3)
    g.opacities = torch.tensor([0.0, 1.0, 0.5])
    g.scales = torch.zeros(3, 3)
    raw = to_splat_array(g)
    assert all(np.isfinite(raw[n]).all() for n in raw.dtype.names)


def test_write_ply_never_overwrites_without_flag(tmp_path):
    path = tmp_path / "a.ply"
    v = to_splat_array(random_gaussians(4))
    write_ply(path, v)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_ply(path, v[:2])
    assert path.read_bytes() == before
    write_ply(path, v[:2], overwrite=True)
    assert len(read_ply(path)[0]) == 2


def test_read_ply_rejects_ascii(tmp_path):
    path = tmp_path / "ascii.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1.0\n")
    with pytest.raises(PlyError, match="binary_little_endian"):
        read_ply(path)


def test_from_splat_array_names_missing_fields():
    with pytest.raises(ValueError, match="opacity"):
        from_splat_array(np.zeros(1, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")]))


# ------------------------------------------------------------------------------ trained tiny run


@pytest.fixture(scope="module")
def run_config(tiny_dataset, tmp_path_factory) -> Path:
    return tiny_checkpoint(tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="module")
def pipeline(run_config):
    from evolsplat_ns.inference.loading import load_pipeline

    _, pipeline, _ = load_pipeline(run_config)
    yield pipeline
    pipeline.datamanager.dataset.close()


def check_splat_values(raw: np.ndarray) -> None:
    for name in raw.dtype.names:
        assert np.isfinite(raw[name]).all(), name
    assert (np.abs(raw["opacity"]) < 20).all()
    log_scales = np.stack([raw[f"scale_{i}"] for i in range(3)])
    assert (log_scales > -20).all() and (log_scales < 10).all()
    quats = np.stack([raw[f"rot_{i}"] for i in range(4)], axis=1)
    np.testing.assert_allclose(np.linalg.norm(quats, axis=1), 1.0, atol=1e-5)


def test_segment_export_matches_prediction(pipeline, tmp_path):
    import open3d as o3d

    from evolsplat_ns.export.exporter import export_splats
    from evolsplat_ns.export.segment import predict_segment_gaussians

    dataset = pipeline.datamanager.dataset
    seg = predict_segment_gaussians(pipeline.model, dataset, 0, include_background=True)
    assert seg.num_foreground < len(seg.gaussians)  # the sky dome is appended
    [path] = export_splats(pipeline.model, dataset, [0], tmp_path, include_background=True)
    back, raw, comments = load_splat(path)
    assert len(raw) == len(seg.gaussians)
    assert f"segment {dataset.key(0)}" in comments
    check_splat_values(raw)
    torch.testing.assert_close(back.means, seg.gaussians.means.cpu(), rtol=0, atol=1e-5)
    # An independent reader: Open3D parses the file as a 3DGS splat (its own layout rules).
    o3d_pc = o3d.t.io.read_point_cloud(str(path))
    assert o3d_pc.point.positions.shape[0] == len(raw)
    # Open3D undoes Inria's channel-major f_rest order into [N, band, channel], our sh layout.
    np.testing.assert_allclose(o3d_pc.point.f_rest.numpy(), seg.gaussians.sh[:, 1:].cpu().numpy(), atol=1e-5)
    np.testing.assert_allclose(o3d_pc.point.opacity.numpy()[:, 0], raw["opacity"])


def test_cli_exports_all_segments_and_refuses_to_overwrite(run_config, tmp_path):
    from evolsplat_ns.cli.export import main

    args = ["gaussian-splat", "--load-config", str(run_config), "--output-dir", str(tmp_path)]
    paths = main(args)
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.glob("*_seg*.ply"))
    assert len(paths) >= 3  # every segment of every scene
    for p in paths:
        check_splat_values(read_ply(p)[0])
    before = {p: p.read_bytes() for p in paths}
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(args + ["--segment", "000"])
    assert all(p.read_bytes() == b for p, b in before.items())
    with pytest.raises(ValueError, match="matches no segment"):
        main(args + ["--segment", "nope", "--overwrite"])
    [again] = main(args + ["--segment", str(paths[0].stem.replace("_seg", "/seg")), "--overwrite"])
    assert again == paths[0]


def test_stock_ns_export_writes_the_shown_segment(run_config, pipeline, tmp_path):
    """nerfstudio's own ``ns-export gaussian-splat`` accepts the model and writes the Gaussians of
    the shown segment in the standard layout (values equal the model's snapshot)."""
    from nerfstudio.scripts.exporter import ExportGaussianSplat

    ExportGaussianSplat(load_config=run_config, output_dir=tmp_path).main()
    back, raw, _ = load_splat(tmp_path / "splat.ply")
    check_splat_values(raw)
    expected = pipeline.model.snapshot_gaussians()  # same checkpoint, same shown segment
    assert len(raw) == len(expected) > 0
    torch.testing.assert_close(back.means, expected.means.cpu(), rtol=0, atol=1e-5)
    torch.testing.assert_close(back.sh, expected.sh.cpu(), rtol=1e-4, atol=1e-4)


def test_export_writes_actors_in_object_frames_with_tracks_or_posed(pipeline, tmp_path):
    """Default: each moving actor's Gaussians in its object frame plus a JSON of per-frame poses;
    ``actors_at``: the actors posed at that frame inside the segment's PLY."""
    import json

    from evolsplat_ns.export.exporter import actors_filename, export_splats

    dataset, model = pipeline.datamanager.dataset, pipeline.model
    [path] = export_splats(model, dataset, [0], tmp_path / "tracks")
    tracks = json.loads((tmp_path / "tracks" / actors_filename(dataset.key(0))).read_text())
    assert tracks["actors"], "the tiny scenes have moving cars"
    frames = tracks["frames"]
    for inst, entry in tracks["actors"].items():
        local = read_ply(tmp_path / "tracks" / entry["ply"])[0]
        assert len(local) > 0
        assert len(entry["obj_to_segment"]) == len(frames)
        assert any(p is not None for p in entry["obj_to_segment"])
        size = np.array(entry["box_size"])
        xyz = np.stack([local["x"], local["y"], local["z"]], 1)
        assert (np.abs(xyz) <= size / 2 + 0.2).all(), "object-frame means lie in the box"
    static = len(read_ply(path)[0])
    t = frames[0]
    [posed] = export_splats(model, dataset, [0], tmp_path / "posed", actors_at=t)
    n_actor = sum(len(read_ply(tmp_path / "tracks" / e["ply"])[0]) for e in tracks["actors"].values()
                  if e["obj_to_segment"][0] is not None)
    assert len(read_ply(posed)[0]) == static + n_actor
    assert not (tmp_path / "posed" / actors_filename(dataset.key(0))).exists()

