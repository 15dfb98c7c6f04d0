"""Export of predicted Gaussians: standard 3DGS PLY files, one per segment (see docs/export_and_inference.md)."""
