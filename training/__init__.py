"""Uptraining (distillation with the early-exit loss), its data and exit calibration.

A sibling of ``server``: it consumes ``model`` (and the exit rule in ``scheduler``) and writes
checkpoints; nothing in ``model``, ``loopserve_kernels``, ``scheduler`` or ``server`` imports it.
"""
