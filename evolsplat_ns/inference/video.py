"""Write rendered frames as an mp4 (imageio + imageio-ffmpeg), or as PNGs when ffmpeg is unavailable."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def ffmpeg_available() -> tuple[bool, str]:
    """(available, reason): imageio-ffmpeg importable and its ffmpeg binary found."""
    try:
        import imageio_ffmpeg

        return True, imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:  # RuntimeError: package present, binary missing
        return False, f"imageio-ffmpeg unavailable ({e})"


def write_png_sequence(frames: Sequence[np.ndarray], folder: Path) -> Path:
    """Frames as ``folder/00000.png, ...`` (created; existing files with those names are replaced)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    return folder


def write_video(frames: Sequence[np.ndarray], path: Path, fps: float) -> Path:
    """Write uint8 [H, W, 3] ``frames`` to ``path`` (mp4, H.264). Without ffmpeg, writes a PNG
    sequence to the folder ``path`` minus its suffix instead and prints why; returns what it wrote."""
    ok, reason = ffmpeg_available()
    if ok:
        import imageio.v2 as imageio

        # H.264 yuv420p needs even sizes: macro_block_size=2 scales an odd size up by one pixel
        # instead of to the next multiple of 16 (the default).
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=2)
        return path
    folder = path.with_suffix("")
    print(f"note: {reason}; writing the camera path as PNG frames in {folder} instead of {path.name} "
          "(pip install imageio-ffmpeg for mp4)")
    return write_png_sequence(frames, folder)
