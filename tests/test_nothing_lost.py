"""Nothing lost: crash-safe checkpoints (kill -9, disk full), resume from the newest intact one,
run folders and exports never silently replaced, run configs loaded without running code, and a
run that mostly skips steps stops."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from evolsplat_ns.engine import checkpoints
from evolsplat_ns.engine.checkpoints import CheckpointError, newest_loadable_checkpoint, save_checkpoint
from tiny_run import lite_trainer

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
    return {"step": step, "pipeline": {"w": torch.full((1000,), float(step))}}


def test_newest_loadable_skips_broken_and_ignores_other_files(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), keep_only_latest=False)
    good = (tmp_path / "step-000000001.ckpt").read_bytes()
    (tmp_path / "step-000000002.ckpt").write_bytes(b"")  # killed right after open()
    (tmp_path / "step-000000003.ckpt").write_bytes(good[: len(good) // 2])  # killed mid-write
    (tmp_path / "README.txt").write_text("my notes")
    (tmp_path / "step-latest.ckpt.bak").write_bytes(b"x")
    skipped: list[str] = []
    path, state = newest_loadable_checkpoint(tmp_path, skipped.append)
    assert path.name == "step-000000001.ckpt" and state["step"] == 1
    assert "step-000000003.ckpt: broken checkpoint" in skipped[0]
    assert "step-000000002.ckpt: broken checkpoint (0 bytes" in skipped[1]
    assert "newest intact checkpoint" in skipped[-1]


def test_no_loadable_checkpoint_names_every_file(tmp_path):
    (tmp_path / "step-000000004.ckpt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match=r"no checkpoint loads: .*step-000000004.ckpt: broken"):
        newest_loadable_checkpoint(tmp_path, lambda m: None)
    with pytest.raises(CheckpointError, match="no step-"):
        newest_loadable_checkpoint(tmp_path / "empty", lambda m: None)


def test_save_deletes_older_only_after_the_new_one_loads(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1))
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda p: (_ for _ in ()).throw(CheckpointError(f"{p}: bad")))
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 2, _state(2))
    assert (tmp_path / "step-000000001.ckpt").is_file(), "the verified older checkpoint survives"
    monkeypatch.undo()
    save_checkpoint(tmp_path, 3, _state(3))
    assert [p.name for _, p in checkpoints.list_checkpoints(tmp_path)] == ["step-000000003.ckpt"]


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "disk full (ENOSPC)"),
                                         (errno.EROFS, "read-only file system (EROFS)")])
def test_write_error_keeps_previous_checkpoint(tmp_path, monkeypatch, code, cause):
    save_checkpoint(tmp_path, 1, _state(1))

    def failing_writer(path: Path, data: bytes) -> None:
        with open(path, "xb") as f:  # half the bytes reach the disk, then it is full
            f.write(bytes(data[: len(data) // 2]))
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(checkpoints, "_write_durably", failing_writer)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, _state(2))
    message = str(err.value)
    assert "\n" not in message
    assert f"cannot write checkpoint {tmp_path / 'step-000000002.ckpt'}: {cause}" in message
    assert f"the previous checkpoint {tmp_path / 'step-000000001.ckpt'} is kept" in message
    assert sorted(os.listdir(tmp_path)) == ["step-000000001.ckpt"], "no partial or temp file left"
    assert newest_loadable_checkpoint(tmp_path)[1]["step"] == 1


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    from tiny_run import lite_trainer
    from evolsplat_ns.engine import checkpoints

    trainer = lite_trainer(Path(sys.argv[1]), Path(sys.argv[2]))
    for step in range(3):
        trainer.train_iteration(step)
    trainer.save_checkpoint(2)
    for step in range(3, 5):
        trainer.train_iteration(step)

    def stalling_writer(path, data):
        with open(path, "xb") as f:
            f.write(bytes(data[: len(data) // 3]))
            f.flush()
            print("WRITING", flush=True)
            time.sleep(600)  # killed here

    checkpoints._write_durably = stalling_writer
    trainer.save_checkpoint(4)
""")


def test_kill_during_save_then_resume_is_exact(tiny_dataset, tmp_path):
    """kill -9 while step 4 is being written: the folder keeps the intact step 2 checkpoint; a
    truncated step-4 file (what nerfstudio's non-atomic writer leaves) is skipped by name; resuming
    from step 2 gives the uninterrupted run's step-3 loss."""
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_dataset), str(tmp_path / "killed"),
                             str(REPO / "tests")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    try:
        for line in proc.stdout:
            if line.strip() == "WRITING":
                break
        else:
            pytest.fail(f"the writer never started: {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    [ckpt_dir] = (tmp_path / "killed").glob("*/evolsplat-lite/run/nerfstudio_models")
    names = sorted(os.listdir(ckpt_dir))
    assert names[0].startswith(checkpoints.TEMP_PREFIX) and names[1:] == ["step-000000002.ckpt"], names
    intact = (ckpt_dir / "step-000000002.ckpt").read_bytes()
    (ckpt_dir / "step-000000004.ckpt").write_bytes(intact[: len(intact) // 3])

    straight = lite_trainer(tiny_dataset, tmp_path / "straight")
    losses = [float(straight.train_iteration(s)[0]) for s in range(4)]
    resumed = lite_trainer(tiny_dataset, tmp_path / "resumed", load_dir=ckpt_dir)
    assert resumed._start_step == 3
    assert float(resumed.train_iteration(3)[0]) == losses[3]


def test_run_folder_with_checkpoints_is_refused_unless_resuming(tiny_dataset, tmp_path, monkeypatch):
    from evolsplat_ns.engine.trainer import RunFolderError

    first = lite_trainer(tiny_dataset, tmp_path)
    first.save_checkpoint(0)
    first.config.save_config()
    config_yml = (first.config.get_base_dir() / "config.yml").read_text()
    monkeypatch.setattr(checkpoints, "_WRITTEN_HERE", set())  # as if another process wrote them
    with pytest.raises(RunFolderError, match=r"already holds a run with checkpoints.*--load-dir.*--overwrite True"):
        lite_trainer(tiny_dataset, tmp_path)
    with pytest.raises(RunFolderError):
        first.config.save_config()  # ns-train saves config.yml before it builds the trainer
    assert (first.config.get_base_dir() / "config.yml").read_text() == config_yml
    assert (first.checkpoint_dir / "step-000000000.ckpt").is_file()
    resumed = lite_trainer(tiny_dataset, tmp_path, load_dir=first.checkpoint_dir)
    assert resumed._start_step == 1


def test_crafted_run_config_runs_no_code(tmp_path):
    from evolsplat_ns.inference.loading import load_pipeline
    from evolsplat_ns.utils.run_config import UnsafeConfigError

    marker = tmp_path / "PWNED"
    config = tmp_path / "config.yml"
    for payload in (f"!!python/object/apply:os.system ['touch {marker}']",
                    f"!!python/object/apply:subprocess.check_call [['touch', '{marker}']]",
                    "!!python/name:builtins.eval", "!!python/module:os",
                    f"!!python/object/apply:nerfstudio.utils.scripts.run_command ['touch {marker}']"):
        config.write_text(f"method_name: x\npipeline: {payload}\n")
        with pytest.raises(UnsafeConfigError, match=rf"{config}: .* line 2 is not a nerfstudio/evolsplat config type"):
            load_pipeline(config)
        assert not marker.exists()


def test_real_run_config_loads(tiny_dataset, tmp_path_factory):
    from nerfstudio.engine.trainer import TrainerConfig

    from evolsplat_ns.utils.run_config import load_run_config
    from tiny_run import tiny_checkpoint

    config = load_run_config(tiny_checkpoint(tiny_dataset, tmp_path_factory))
    assert isinstance(config, TrainerConfig) and config.method_name == "evolsplat-lite"
    assert isinstance(config.pipeline.datamanager.data, Path)


def test_stock_ns_export_does_not_overwrite(tiny_dataset, tmp_path_factory, tmp_path, monkeypatch):
    from nerfstudio.scripts.exporter import ExportGaussianSplat

    from evolsplat_ns.engine.ns_hooks import OVERWRITE_ENV, ExportExistsError
    from tiny_run import tiny_checkpoint

    run_config = tiny_checkpoint(tiny_dataset, tmp_path_factory)
    mine = tmp_path / "splat.ply"
    mine.write_bytes(b"the user's own splat")
    with pytest.raises(ExportExistsError, match=rf"refusing to replace existing {mine}: .*{OVERWRITE_ENV}=1"):
        ExportGaussianSplat(load_config=run_config, output_dir=tmp_path).main()
    assert mine.read_bytes() == b"the user's own splat"
    monkeypatch.setenv(OVERWRITE_ENV, "1")
    ExportGaussianSplat(load_config=run_config, output_dir=tmp_path).main()
    assert mine.read_bytes().startswith(b"ply\n") and os.listdir(tmp_path) == ["splat.ply"]


def test_mostly_skipped_run_stops(tiny_dataset, tmp_path, monkeypatch):
    """Every segment empty (the first one included): setup succeeds, each step is skipped through
    the trainer's skip logic, and the run stops once the skip limit is passed."""
    from evolsplat_ns.data.dataset import MultiSceneDataset
    from evolsplat_ns.data.types import PointCloud
    from evolsplat_ns.engine.skips import SkipLimitError

    empty = PointCloud(torch.zeros(0, 3), torch.zeros(0, 3))
    monkeypatch.setattr(MultiSceneDataset, "point_cloud", lambda self, i: empty)
    trainer = lite_trainer(tiny_dataset, tmp_path / "limited", max_skipped_fraction=0.5, skip_window=4)
    for step in range(2):
        assert math.isnan(float(trainer.train_iteration(step)[0]))
    with pytest.raises(SkipLimitError, match=r"stopping at step 2: 3 of the last 4 steps were skipped \(3 empty_segment\)"):
        trainer.train_iteration(2)


def test_skip_limit_counts_recent_steps_only():
    from evolsplat_ns.engine.skips import SkipLimit, SkipLimitError

    limit = SkipLimit(0.5, 4)
    for step in (0, 1, 10, 11, 20, 21):  # two of every four steps: at the limit, not over it
        limit.record(step, "nonfinite")
    with pytest.raises(SkipLimitError):
        limit.record(22, "oom")
    SkipLimit(1.0, 1).record(0, "oom")  # 1 = no limit


def test_process_waymo_overwrite_keeps_scene_when_source_is_corrupt(tmp_path):
    from evolsplat_ns.data.waymo.convert import DONE_MARKER, SegmentJob, run_jobs

    out = tmp_path / "processed"
    scene = out / "000"
    (scene / "images").mkdir(parents=True)
    (scene / "images" / "000_0.jpg").write_bytes(b"the user's converted image")
    (scene / DONE_MARKER).write_text("{}")
    corrupt = tmp_path / "corrupt.tfrecord"
    corrupt.write_bytes(b"\x00" * 5 + b"not a tfrecord")
    [result] = run_jobs([SegmentJob(corrupt, "000", out)], overwrite=True)
    assert result.status == "failed"
    assert (scene / "images" / "000_0.jpg").read_bytes() == b"the user's converted image"
    staging = out / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_deterministic_setting_repeats_runs_at_two_threads(tiny_dataset, tmp_path):
    """``deterministic`` pins one CPU thread, so two runs (and a resume) give identical losses even
    when the process was started with more threads."""
    losses = []
    try:
        for run in "ab":
            torch.set_num_threads(2)
            trainer = lite_trainer(tiny_dataset, tmp_path / run, deterministic=True)
            assert torch.get_num_threads() == 1
            losses.append([float(trainer.train_iteration(s)[0]) for s in range(3)])
    finally:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(False)
    assert losses[0] == losses[1]
