"""Readers: one module per source shape. Each reader is a step that yields upstream records, then its own."""
