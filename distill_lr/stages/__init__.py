"""Stages that run after the layer loop on the whole compressed model (``stages.base.RunStage``)."""
