"""nerfstudio viewer surface of EVolSplat.

- :mod:`.controls`: the pipeline's GUI (scene / segment dropdowns, source-view slider).
- :mod:`.scene`: the shown segment's camera frustums and a new browser's starting viewpoint.
- :mod:`.state_cache`: reuse of the encoded shared state between frames (used by the model).

Nothing is imported here: the model imports :mod:`.state_cache` while :mod:`.controls` imports the
engine, so eager imports would be circular.
"""
