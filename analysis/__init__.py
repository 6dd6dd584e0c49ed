"""Pandas comparison of measured corrections with the memoryless predictions."""
