"""EVolSplat model: Gaussian nodes, sparse volume, projector, heads, renderer."""
