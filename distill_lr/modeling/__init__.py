"""The remote-code boundary: the files copied beside every compressed checkpoint (torch and transformers only)."""
