"""``whiten``: SVD of each weight times the Cholesky factor of its input moment (SVD-LLM), output-optimal; training-free."""

from distill_lr.methods.base import training_free

build = training_free("whiten")
