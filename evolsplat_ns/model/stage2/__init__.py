"""Online stage 2: refine moving actors' Gaussians and per-frame poses during stage-1 training.

``se3`` (exp/log maps), ``heads`` (GaussianRefineHead, PoseRefineHead), ``refiner`` (Stage2Refiner:
both heads applied to a segment's actors), ``loss`` (Stage2CompleteLoss). The schedule, modes,
optimizer group and statistics live in :mod:`evolsplat_ns.engine.stage2` (the controller).
"""
