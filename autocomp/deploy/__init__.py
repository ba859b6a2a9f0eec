"""Deployment formats of compressed models.

:mod:`autocomp.deploy.pack` turns one simulated compressed layer into the tensors a packed format
stores (bit-packed codes, fp16 scales, packed zero points, sparse metadata) and back, bit-exactly;
:mod:`autocomp.deploy.packed_io` writes and reads a whole model as one safetensors file whose size
on disk is the size :mod:`autocomp.evaluators.size` accounts for.
"""
