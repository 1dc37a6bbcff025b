"""The bundled demo model: a 32x32 shapes world, its training, evaluation and preset sweep.

``python -m sega.demo train|eval|sweep``; the weights live in ``assets/shapes-model``.
"""
