"""Analysis of a run: effective centers and the pictures of ``softtriple report``."""
