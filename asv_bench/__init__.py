"""asv benchmarks for numbaconv (see benchmarks.py)."""
