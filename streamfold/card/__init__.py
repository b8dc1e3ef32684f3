"""Floor 4: the model card of an output (``render``), its table of changes, and the card of a mode change."""
