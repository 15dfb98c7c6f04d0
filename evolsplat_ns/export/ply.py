"""PLY files of 3DGS splats: the generic reader/writer lives in :mod:`evolsplat_ns.utils.ply` (the
data layer writes point clouds with it too); re-exported here for the export code and its users."""

from evolsplat_ns.utils.ply import PlyError, read_ply, write_ply

__all__ = ["PlyError", "read_ply", "write_ply"]
