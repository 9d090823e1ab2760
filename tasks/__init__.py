"""Glue shared by the entry scripts (task base class, shared evaluation loops); see tasks/base.py."""
