"""``svd``: the truncated SVD of each weight, the best rank-r approximation of W itself; training-free."""

from distill_lr.methods.base import training_free

build = training_free("svd")
