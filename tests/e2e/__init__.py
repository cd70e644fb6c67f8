"""Nested end-to-end test bed: see bed.py (outer side) and inside.py (inside the L1 VM)."""
