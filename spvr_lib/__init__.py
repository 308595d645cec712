"""spvr_lib: the reproducible companion to "SPvR: Structured Pruning via Ranking" (UAI 2025)."""
__version__ = "0.1.0"
