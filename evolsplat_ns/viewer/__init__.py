"""nerfstudio viewer surface of EVolSplat.

- :mod:`.controls`: the pipeline's GUI (scene / segment dropdowns, source-view slider), built by the
  pipeline from its ``viewer_controls`` config.
- :mod:`.scene`: the shown segment's camera frustums and a new browser's starting viewpoint.
"""
