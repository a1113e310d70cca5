"""Runnable demos, one idea each: ``python -m demos.demo_ragged_mask --quick``."""
