"""Helpers below every other attnopt layer: they import nothing from attnopt (and no torch)."""
