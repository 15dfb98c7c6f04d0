"""Binary little-endian PLY files of one ``vertex`` element, as numpy structured arrays.

Writing and reading are vectorised (one ``tobytes`` / ``frombuffer`` per file), so a million-vertex
splat takes well under a second, unlike per-vertex writers. Only what 3DGS viewers need is
supported: a single vertex element with scalar properties (no lists, no faces).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# PLY scalar type names <-> little-endian numpy dtypes (both the classic and the sized spellings).
_PLY_TO_NUMPY = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}
_NUMPY_TO_PLY = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int",
                 "u4": "uint", "f4": "float", "f8": "double"}


class PlyError(ValueError):
    """A PLY file this module cannot read (names the file and what is wrong)."""


def write_ply(path: Path | str, vertices: np.ndarray, comments: Sequence[str] = (),
              overwrite: bool = False) -> Path:
    """Write ``vertices`` (structured array [N], scalar fields) as a binary little-endian PLY.

    Args:
        path: output file; its folder must exist.
        vertices: one record per vertex; field names become property names, in order.
        comments: header comment lines (no newlines).
        overwrite: replace an existing file; otherwise an existing file raises FileExistsError
            (checked atomically by opening with mode ``"x"``).
    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if vertices.dtype.names is None or vertices.ndim != 1:
        raise ValueError(f"write_ply({path}): vertices must be a 1-D structured array")
    fields = [(name, vertices.dtype.fields[name][0]) for name in vertices.dtype.names]
    header = ["ply", "format binary_little_endian 1.0"]
    for line in comments:
        if "\n" in line:
            raise ValueError(f"write_ply({path}): comment {line!r} contains a newline")
        header.append(f"comment {line}")
    header.append(f"element vertex {len(vertices)}")
    for name, dt in fields:
        key = dt.str.lstrip("<>|=")
        if key not in _NUMPY_TO_PLY or dt.shape:
            raise ValueError(f"write_ply({path}): field {name} has unsupported dtype {dt}")
        header.append(f"property {_NUMPY_TO_PLY[key]} {name}")
    header.append("end_header")
    # Packed little-endian records, whatever the caller's byte order or padding.
    packed = vertices.astype(np.dtype([(n, dt.newbyteorder("<")) for n, dt in fields]))
    try:
        with open(path, "wb" if overwrite else "xb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(packed.tobytes())
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
    return path


def read_ply(path: Path | str) -> tuple[np.ndarray, list[str]]:
    """Read a binary little-endian PLY with one vertex element.

    Returns:
        (vertices, comments): structured array [N] with one field per property, header comments.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise PlyError(f"{path}: not a PLY file (no 'ply' magic or 'end_header' line)")
    lines = data[:end].decode("ascii", errors="replace").splitlines()[1:]
    comments, fields, count, fmt = [], [], None, None
    for line in lines:
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "comment":
            comments.append(line[len("comment "):])
        elif words[0] == "element":
            if count is not None or words[1] != "vertex":
                raise PlyError(f"{path}: only files with a single 'vertex' element are supported")
            count = int(words[2])
        elif words[0] == "property":
            if words[1] == "list" or words[1] not in _PLY_TO_NUMPY:
                raise PlyError(f"{path}: unsupported property '{line}' (only scalar properties)")
            fields.append((words[2], _PLY_TO_NUMPY[words[1]]))
    if fmt != "binary_little_endian":
        raise PlyError(f"{path}: format {fmt!r} is not supported (only binary_little_endian)")
    if count is None:
        raise PlyError(f"{path}: no 'element vertex' line in the header")
    dtype = np.dtype(fields)
    body = data[end + len(b"end_header\n"):]
    if len(body) < count * dtype.itemsize:
        raise PlyError(f"{path}: truncated: {count} vertices need {count * dtype.itemsize} bytes, "
                       f"the file has {len(body)}")
    return np.frombuffer(body, dtype=dtype, count=count).copy(), comments
