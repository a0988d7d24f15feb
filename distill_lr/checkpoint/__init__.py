"""Checkpoint I/O, one module per concern: reading HF folders, file primitives, the resume manifest, the compressed format."""
