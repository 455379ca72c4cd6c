"""``/v1/process``: one ``generate`` or ``embed`` call of the design's contract."""
