"""A generated bad-input corpus: each case one defect in a copy of the tiny dataset.

For every case, ``evolsplat-data inspect`` and a tiny training start (the same validator, run by
the data manager before step 0) must name the broken file and exit non-zero without a traceback,
where the defect makes the data unusable; odd-but-usable cases only warn in inspect.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from evolsplat_ns.cli.data import main as data_main
from evolsplat_ns.data import layout as L
from evolsplat_ns.utils.errors import UserError, install_excepthook

from tiny_run import lite_trainer

SCENE = "001"
EVAL_SCENE = "002"  # the last scene: evolsplat-lite's eval scene
REPO = Path(__file__).resolve().parents[1]


def _write(rel: str, text: str) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        (data / SCENE / rel).write_text(text)
        return data / SCENE / rel
    return breaker


def _image(rel: str, w: int, h: int) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        L.write_mask(data / SCENE / rel, np.zeros((h, w), bool))
        return data / SCENE / rel
    return breaker


def _npy(rel: str, array: np.ndarray) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        np.save(data / SCENE / rel, array)
        return data / SCENE / rel
    return breaker


def _truncate(rel: str, scene: str = SCENE) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        path = data / scene / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    return breaker


def _lidar(rel: str, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        path = data / SCENE / rel
        L.write_lidar(path, edit(L.read_lidar(path)))
        return path
    return breaker


def _all_lidar_at_origin(data: Path) -> Path:
    for path in sorted((data / SCENE / "lidar").glob("*.bin")):
        pts = L.read_lidar(path)
        pts[:, 3:6] = 0.0
        L.write_lidar(path, pts)
    return data / SCENE / "lidar" / "000.bin"


def _instances(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        path = data / SCENE / "instances" / "instances_info.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return path
    return breaker


def _each_annotation(edit: Callable[[dict], None]) -> Callable[[dict], dict]:
    def apply(info: dict) -> dict:
        for inst in info.values():
            edit(inst["frame_annotations"])
        return info
    return apply


def _drop_frame(t: int) -> Callable[[Path], Path]:
    def breaker(data: Path) -> Path:
        for path in (data / SCENE).rglob(f"{t:03d}*"):
            path.unlink()
        return data / SCENE / "images"
    return breaker


def _keep_one_frame(data: Path) -> Path:
    for path in (data / SCENE).rglob("*"):
        if path.is_file() and path.parent.name != "instances" and path.name[:3].isdigit() and path.name[:3] != "000":
            path.unlink()
    return data / SCENE / "images"


def _frame_instances_list(data: Path) -> Path:
    path = data / SCENE / "instances" / "frame_instances.json"
    path.write_text("[[0, 1], [0]]")
    return path


def _far_pose(data: Path) -> Path:
    path = data / SCENE / "ego_pose" / "003.txt"
    M = L.read_matrix4(path)
    M[0, 3] = 1e9
    L.write_matrix4(path, M)
    return path


SCALED = [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]
H, W = 48, 64

# case -> (breaker, problem regex, inspect exit code, training refuses)
CASES: dict[str, tuple[Callable[[Path], Path], str, int, bool]] = {
    "focal 1e-6 px": (_write("intrinsics/0.txt", "1e-6 1e-6 32 24 0 0 0 0 0"), r"focal length fu=1e-06 px is implausible", 1, True),
    "principal point outside": (_write("intrinsics/1.txt", "68 68 500 24 0 0 0 0 0"), r"principal point \(500, 24\) lies outside", 1, True),
    "sky mask wrong size": (_image("sky_masks/003_0.png", 32, 24), r"mask size 32x24 differs from its image's 64x48", 1, True),
    "dynamic mask wrong size": (_image("dynamic_masks/all/004_1.png", 64, 40), r"mask size 64x40 differs", 1, True),
    "depth wrong shape": (_npy("depth/002_0.npy", np.ones((24, 32), np.float32)), r"depth array has shape \[24, 32\], expected \[48, 64\]", 1, True),
    "flow without 2 channels": (_npy("flow/003_2.npy", np.zeros((H, W), np.float16)), r"flow array has shape \[48, 64\], expected \[48, 64, 2\]", 1, True),
    "corrupt depth npy": (_truncate("depth/006_1.npy"), r"unreadable depth array \(truncated", 1, True),
    "zero-byte lidar": (_write("lidar/004.bin", ""), r"empty LiDAR file \(0 points\)", 1, True),
    "lidar at 1e30": (_lidar("lidar/002.bin", lambda p: np.where(np.arange(14) == 3, 1e30, p).astype(np.float32)),
                      r"LiDAR coordinates up to 1e\+30 m", 1, True),
    "all lidar at origin": (_all_lidar_at_origin, r"all \d+ LiDAR points are at the origin", 1, True),
    "missing frame in numbering": (_drop_frame(5), r"frame numbering has 1 gap\(s\): no images for frame\(s\) 005", 1, True),
    "one-frame scene": (_keep_one_frame, r"only 1 frame", 0, False),  # trains: cameras of the frame are sources (issue 12)
    "instances without obj_to_world": (_instances(_each_annotation(lambda a: a.pop("obj_to_world"))),
                                       r"frame_annotations has no obj_to_world list", 1, True),
    "instances_info is a list": (_instances(lambda info: list(info.values())), r"must be a JSON object of instances keyed by id, found a JSON list", 1, True),
    "3x3 box matrices": (_instances(_each_annotation(lambda a: a.update(obj_to_world=[np.eye(3).tolist()] * len(a["frame_idx"])))),
                         r"obj_to_world has shape \[3, 3\], expected a 4x4 rigid matrix", 1, True),
    "scaled box matrices": (_instances(_each_annotation(lambda a: a.update(obj_to_world=[SCALED] * len(a["frame_idx"])))),
                            r"obj_to_world is not a rigid transform", 1, True),
    "frame_instances is a list": (_frame_instances_list, r"must be a JSON object of frame index -> list", 1, True),
    "ego pose 1e9 m away": (_far_pose, r"more than 1e\+07 m from the world origin", 1, True),
    "truncated image in eval scene": (_truncate("images/007_1.jpg", EVAL_SCENE), r"unreadable image \(file is truncated", 1, True),
}


@pytest.fixture
def broken(request, tiny_dataset, tmp_path) -> tuple[Path, Path, str]:
    """(dataset copy with one defect, the file it names, the problem regex)."""
    breaker, problem, *_ = CASES[request.param]
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    return data, breaker(data), problem


def _named(text: str, path: Path, problem: str) -> bool:
    import re

    return re.search(rf"{re.escape(str(path))}: [^\n]*{problem}", text) is not None


@pytest.mark.parametrize("broken", sorted(CASES), indirect=True)
def test_inspect_names_the_file(broken, capsys, request):
    data, path, problem = broken
    case = request.node.callspec.params["broken"]
    rc = data_main(["inspect", "--data", str(data)])
    out = capsys.readouterr()
    assert rc == CASES[case][2], out.out
    assert "Traceback" not in out.out + out.err
    assert _named(out.out, path, problem), out.out
    if rc == 0:
        assert "WARNING" in out.out


@pytest.mark.parametrize("broken", sorted(case for case, c in CASES.items() if c[3]), indirect=True)
def test_training_start_refuses_naming_the_file(broken, tmp_path, capsys):
    data, path, problem = broken
    with pytest.raises(UserError) as err:
        lite_trainer(data, tmp_path / "runs")
    assert _named(str(err.value), path, problem), str(err.value)
    capsys.readouterr()
    install_excepthook()  # what ns-train does for an uncaught error (Python then exits with 1)
    sys.excepthook(type(err.value), err.value, err.value.__traceback__)
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and str(path) in printed


def test_full_decode_finds_what_headers_cannot(tiny_dataset, tmp_path, capsys):
    """A JPEG whose middle is garbage keeps its header and end marker: only --full decodes it."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    path = data / SCENE / "images" / "005_0.jpg"
    raw = bytearray(path.read_bytes())
    raw[200:-10] = b"\x00" * (len(raw) - 210)
    path.write_bytes(bytes(raw))
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(raw))) as im:
            im.load()
        pytest.skip("this PIL decodes the zeroed JPEG without error")
    except OSError:
        pass
    assert data_main(["inspect", "--data", str(data)]) == 0
    capsys.readouterr()
    assert data_main(["inspect", "--data", str(data), "--full"]) == 1
    assert f"{path}: unreadable image" in capsys.readouterr().out


def test_ns_train_prints_the_message_without_traceback(tiny_dataset, tmp_path):
    """The real ns-train: a data error ends it with one message naming the file, exit status 1."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    path, problem = CASES["zero-byte lidar"][0](data), CASES["zero-byte lidar"][1]
    cmd = [str(Path(sys.executable).with_name("ns-train")), "evolsplat-lite", "--data", str(data),
           "--output-dir", str(tmp_path / "out"), "--machine.device-type", "cpu", "--vis", "tensorboard"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("EVOLSPLAT_DEBUG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and _named(proc.stderr, path, problem), proc.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**env, "EVOLSPLAT_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
