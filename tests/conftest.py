"""Shared fixtures: tiny synthetic datasets (generated once per session) and paths to shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# spconv on CPU is only correct single-threaded; the model enforces that itself, but keeping
# the suite at 1 thread also makes CPU timings steadier on the 2-core CI machine.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("EVOLSPLAT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _torch_globals_restored():
    """Each test starts with the suite's torch globals: a trainer with ``deterministic=True`` sets
    deterministic algorithms process-wide, and exactness tests comparing an in-process run with a
    subprocess's must not depend on which tests ran before them."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.is_file():
        pytest.skip(f"shared test data {p} is absent (set EVOLSPLAT_SHARED_DATA to its folder)")
    return p


# ----------------------------------------------------------------------------- synthetic datasets

# 3 scenes x 12 frames x 3 cameras at 64x48 with a 16 x 256 LiDAR: every modality present, about
# 4k LiDAR points per frame, two moving cars per scene; generated once (a few seconds) per session.
TINY_SYNTH = dict(scenes=3, frames=12, cameras=3, width=64, height=48, lidar_beams=16,
                  lidar_azimuths=256, moving_cars=2, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A folder of synthetic drivestudio scenes ``000``, ``001``, ``002`` (see ``TINY_SYNTH``).

    Shared by the whole session: tests must not modify it (copy it with ``dataset_copy`` first).
    """
    from evolsplat_ns.data.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(SynthConfig(**TINY_SYNTH), out)
    return out


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path) -> Path:
    """A private copy of ``tiny_dataset`` that a test may break."""
    import shutil

    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
