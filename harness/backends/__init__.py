"""Backends: one per framework and gradient path; see base.py for the contract."""
