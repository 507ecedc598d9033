"""Training code for emoji64, edgegen's small default text-to-image model (not needed at runtime)."""
