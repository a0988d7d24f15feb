"""``pca``: each linear's outputs projected on their top principal directions over the calibration set; training-free."""

from distill_lr.methods.base import training_free

build = training_free("pca")
