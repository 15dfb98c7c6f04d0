"""Preset files: loading, validation against the config tree, and ns-train flag round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import tyro
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.models.base_model import ModelConfig

from evolsplat_ns.cli import train as train_cli
from evolsplat_ns.engine.datamanager import EVolSplatDataManagerConfig
from evolsplat_ns.engine.pipeline import EVolSplatPipelineConfig
from evolsplat_ns.engine.trainer import EVolSplatTrainerConfig
from evolsplat_ns.presets import PresetError, apply_overrides, load_preset, preset_to_cli_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def parse_like_ns_train(config, args: list[str]):
    """Parse ``args`` onto ``config`` with tyro configured as ns-train configures it."""
    return tyro.cli(tyro.conf.FlagConversionOff[type(config)], default=config, args=args)


@pytest.fixture
def probe_config() -> EVolSplatTrainerConfig:
    """The project's trainer/pipeline/datamanager tree with nerfstudio's base model config, so the
    preset machinery is tested without constructing (or importing) the EVolSplat model."""
    return EVolSplatTrainerConfig(
        method_name="probe",
        pipeline=EVolSplatPipelineConfig(datamanager=EVolSplatDataManagerConfig(), model=ModelConfig()),
        optimizers={"networks": {"optimizer": AdamOptimizerConfig(lr=1e-3),
                                 "scheduler": ExponentialDecaySchedulerConfig()}},
    )


@pytest.fixture(scope="module")
def method_configs():
    """The registered method configs by name; skipped while the model package cannot be imported."""
    mc = pytest.importorskip("evolsplat_ns.method_configs", exc_type=ImportError,
                             reason="evolsplat_ns.method_configs does not import (model not available)")
    return {"evolsplat": mc.evolsplat_config(), "evolsplat-lite": mc.evolsplat_lite_config(),
            "evolsplat-stage2": mc.evolsplat_stage2_config(), "evolsplat-stage2-lite": mc.evolsplat_stage2_lite_config()}


# Every kind of leaf a preset sets: int, float from int, bool, None, Literal, Path, variable and
# fixed-length tuples, an empty tuple, nested dataclasses, and a dict field (optimizers).
MIXED = {
    "max_num_iterations": 7,
    "gradient_clip_val": 1.5,
    "use_mixed_precision": True,
    "vis": "tensorboard",
    "pipeline": {"datamanager": {"data": "scenes/x", "dataset": {
        "cameras": [0, 1, 2], "downscale": 2, "eval_scenes": [], "train_on_eval_scenes": True,
        "pointcloud": {"crop_z": [-3, 20.5], "depth_consistency_tol": None, "frame_stride": 2}}}},
    "optimizers": {"networks": {"optimizer": {"lr": 2.5e-4}}},
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shipped presets


def test_presets_are_shipped():
    assert {"waymo_full.yaml", "waymo_drop50.yaml", "demo_cpu.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("preset", SHIPPED, ids=lambda p: p.name)
def test_shipped_preset_applies_and_round_trips(preset: Path, method_configs):
    method, overrides = load_preset(preset)
    assert method in method_configs, f"{preset.name}: method {method!r}"
    applied = apply_overrides(method_configs[method], overrides, source=str(preset))
    assert parse_like_ns_train(method_configs[method], preset_to_cli_args(overrides)) == applied


def test_waymo_presets_differ_only_where_they_say(method_configs):
    full = apply_overrides(method_configs["evolsplat"], load_preset(CONFIGS / "waymo_full.yaml")[1])
    drop = apply_overrides(method_configs["evolsplat"], load_preset(CONFIGS / "waymo_drop50.yaml")[1])
    data = full.pipeline.datamanager.dataset
    assert (data.cameras, data.downscale) == ((0, 1, 2), 2.0)
    assert drop.pipeline.datamanager.dataset.pointcloud.frame_stride == 2
    drop.pipeline.datamanager.dataset.pointcloud.frame_stride = 1
    assert drop == full


# ----------------------------------------------------------------------------- validation


def test_unknown_key_names_file_key_and_valid_fields(probe_config):
    with pytest.raises(PresetError) as e:
        apply_overrides(probe_config, {"pipeline": {"datamanager": {"dataset": {"segment_lenght": 5}}}},
                        source="configs/x.yaml")
    msg = str(e.value)
    assert "configs/x.yaml" in msg and "'pipeline.datamanager.dataset.segment_lenght'" in msg
    assert "under 'pipeline.datamanager.dataset'" in msg and "segment_length" in msg
    with pytest.raises(PresetError, match="unknown key 'max_iters'; valid keys at the top level: .*max_num_iterations"):
        apply_overrides(probe_config, {"max_iters": 5})
    with pytest.raises(PresetError, match="unknown key 'optimizers.net'; valid keys under 'optimizers': networks"):
        apply_overrides(probe_config, {"optimizers": {"net": {}}})


@pytest.mark.parametrize("overrides, expected", [
    ({"max_num_iterations": "10"}, r"'max_num_iterations' expects int, got '10'"),
    ({"max_num_iterations": True}, r"expects int, got True"),
    ({"use_mixed_precision": 1}, r"'use_mixed_precision' expects bool"),
    ({"vis": "tensorbaord"}, r"'vis' must be one of \['viewer', "),
    ({"pipeline": {"datamanager": {"dataset": {"pointcloud": {"crop_z": [1.0]}}}}}, r"crop_z' expects 2 values"),
    ({"pipeline": {"datamanager": {"dataset": {"cameras": ["front"]}}}}, r"'pipeline.datamanager.dataset.cameras'"),
    ({"pipeline": {"datamanager": 3}}, r"'pipeline.datamanager' is a group of settings; give a mapping"),
])
def test_wrong_value_type_is_reported(probe_config, overrides, expected):
    with pytest.raises(PresetError, match=expected):
        apply_overrides(probe_config, overrides, source="p.yaml")


def test_apply_leaves_the_input_config_untouched(probe_config):
    applied = apply_overrides(probe_config, MIXED)
    assert probe_config.max_num_iterations != 7 and applied.max_num_iterations == 7
    assert probe_config.optimizers["networks"]["optimizer"].lr == 1e-3
    assert applied.optimizers["networks"]["optimizer"].lr == 2.5e-4
    assert applied.pipeline.datamanager.data == Path("scenes/x")


# ----------------------------------------------------------------------------- ns-train flags


def test_cli_args_round_trip_through_tyro(probe_config):
    args = preset_to_cli_args(MIXED)
    assert args[:4] == ["--max-num-iterations", "7", "--gradient-clip-val", "1.5"]
    assert parse_like_ns_train(probe_config, args) == apply_overrides(probe_config, MIXED)


def test_user_flags_after_the_preset_win(probe_config):
    args = preset_to_cli_args(MIXED) + ["--max-num-iterations", "9", "--pipeline.datamanager.dataset.cameras", "4"]
    parsed = parse_like_ns_train(probe_config, args)
    assert parsed.max_num_iterations == 9 and parsed.pipeline.datamanager.dataset.cameras == (4,)


def test_flag_names_follow_tyro():
    args = preset_to_cli_args({"pipeline": {"model": {"sparseConv_outdim": 8, "enable_background": False}},
                               "pipeline_x": {"_private_name": None, "eval_scenes": ["a", "b"]}})
    assert args == ["--pipeline.model.sparseConv-outdim", "8", "--pipeline.model.enable-background", "False",
                    "--pipeline-x._private-name", "None", "--pipeline-x.eval-scenes", "a", "b"]


# ----------------------------------------------------------------------------- files and the command


def test_base_presets_merge_and_cycles_are_refused(tmp_path):
    write(tmp_path, "a.yaml", "method: evolsplat\npipeline: {model: {sh_degree: 1, voxel_size: 0.1}}\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\npipeline: {model: {voxel_size: 0.2}}\n")
    assert load_preset(b) == ("evolsplat", {"pipeline": {"model": {"sh_degree": 1, "voxel_size": 0.2}}})
    write(tmp_path, "c.yaml", "base: d.yaml\nmethod: evolsplat\n")
    with pytest.raises(PresetError, match="cycle"):
        load_preset(write(tmp_path, "d.yaml", "base: c.yaml\n"))


def test_bad_preset_files_are_reported(tmp_path):
    with pytest.raises(PresetError, match="missing 'method: NAME'"):
        load_preset(write(tmp_path, "m.yaml", "max_num_iterations: 3\n"))
    with pytest.raises(PresetError, match="a preset is a YAML mapping"):
        load_preset(write(tmp_path, "l.yaml", "- 1\n"))
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "nope.yaml")


def test_print_only_shows_the_ns_train_command(tmp_path, probe_config, monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "registered_method_config", lambda method, preset: probe_config)
    preset = write(tmp_path, "p.yaml", "method: probe\nmax_num_iterations: 5\nmachine: {device_type: cpu}\n")
    assert train_cli.main(["--preset", str(preset), "--print-only", "--max-num-iterations", "6"]) == 0
    command = capsys.readouterr().out.split()
    assert command == ["ns-train", "probe", "--max-num-iterations", "5", "--machine.device-type", "cpu",
                       "--max-num-iterations", "6"]
    assert parse_like_ns_train(probe_config, command[2:]).max_num_iterations == 6


def test_invalid_preset_exits_with_the_message(tmp_path, probe_config, monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "registered_method_config", lambda method, preset: probe_config)
    preset = write(tmp_path, "p.yaml", "method: probe\nmachine: {device: cpu}\n")
    assert train_cli.main(["--preset", str(preset), "--print-only"]) == 2
    assert f"{preset}: unknown key 'machine.device'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- presets run


TINY_OVERRIDES = {
    "machine": {"device_type": "cpu"}, "vis": "tensorboard",
    "pipeline": {"datamanager": {"prefetch": False, "dataset": {
        "num_eval_scenes": 1, "segment_length": 12, "segment_stride": 6, "preload": False, "downscale": 1}},
        "model": {"renderer": "reference", "max_gaussians_per_segment": 800}},
}


@pytest.mark.parametrize("preset", SHIPPED, ids=lambda p: p.name)
def test_shipped_preset_trains_one_step(preset: Path, method_configs, tiny_dataset, tmp_path):
    """Each preset, on tiny data (its data path and sizes overridden), sets up and takes a step."""
    import math

    import torch

    method, overrides = load_preset(preset)
    cfg = apply_overrides(method_configs[method], overrides, source=str(preset))
    cfg = apply_overrides(cfg, TINY_OVERRIDES, source="tiny overrides")
    cfg.data = cfg.pipeline.datamanager.data = tiny_dataset
    cfg.output_dir, cfg.timestamp, cfg.experiment_name = tmp_path, "run", "preset"
    torch.manual_seed(0)
    trainer = cfg.setup(local_rank=0, world_size=1)
    trainer.setup()
    try:
        loss, _, _ = trainer.train_iteration(0)
        assert math.isfinite(float(loss)) and trainer.skipped_steps == {}
    finally:
        trainer.pipeline.datamanager.dataset.close()


def test_demo_preset_points_at_what_the_demo_writes():
    import re

    demo = (CONFIGS.parent / "scripts" / "demo.sh").read_text()
    _, overrides = load_preset(CONFIGS / "demo_cpu.yaml")
    out = re.search(r"OUT=\$\{OUT:-([^}]+)\}", demo).group(1)
    w, h = re.search(r"DEVICE=cpu W=(\d+) H=(\d+)", demo).groups()
    assert overrides["pipeline"]["datamanager"]["data"] == f"{out}/data-{w}x{h}"
