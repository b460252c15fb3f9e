"""The multi-adapter serving engine."""
