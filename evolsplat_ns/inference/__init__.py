"""Inference without training: loading a run, zero-shot evaluation on new scenes, camera-path videos."""
