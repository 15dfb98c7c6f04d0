"""Data: the drivestudio layout, synthetic scenes, MultiSceneDataset, RGB point clouds."""
