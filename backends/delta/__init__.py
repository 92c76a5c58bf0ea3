"""The chunked form of delta-rule recurrences (``delta`` and ``gated_delta`` transitions)."""
