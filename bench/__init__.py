"""Profiling suite: ``python -m bench NAME [options]``; each benchmark prints its figures."""
