"""Sync stages wired to each system: extract and load (see base.py)."""
