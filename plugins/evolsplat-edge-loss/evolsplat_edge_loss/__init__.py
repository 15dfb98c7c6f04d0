"""An example third-party evolsplat-ns plugin: the ``l1_edge`` photometric loss."""

from evolsplat_edge_loss.loss import image_gradients, l1_edge_loss

__all__ = ["image_gradients", "l1_edge_loss"]
