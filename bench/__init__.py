"""lmdist benchmarks: `python bench/run.py` (see the README's Performance section)."""
