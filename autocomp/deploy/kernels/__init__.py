"""Real kernels for compressed layers: which layer can run one, the modules that do, and a whole model.

Compression in autocomp is simulated in float; a deployment runs the packed codes through a kernel.
Three modules, each importing only the ones before it:

:mod:`~autocomp.deploy.kernels.choose`
    The registry :data:`KERNELS` (name -> :class:`KernelSpec`, in order of preference) and the
    choice: :func:`choose_kernel` (which kernel runs a layer of a plan and shape on a device, or why
    none does, as a :class:`KernelChoice`), :func:`compute_dtype`, :func:`format_label`,
    :func:`int4_op_group`; the arithmetic of every kernel and where it is exact. Pure: no device.
:mod:`~autocomp.deploy.kernels.modules`
    The ``nn.Module`` of each kernel (:class:`KernelLinear` and its subclasses,
    :class:`QuantizedEmbedding`; :data:`KERNEL_MODULES` by registry name), built from a
    :class:`~autocomp.pipeline.layer.CompressedWeight`, and the code relations they rely on
    (:func:`dequantize`, :func:`exact_zero_codes`, :func:`check_codes_reproduce`).
:mod:`~autocomp.deploy.kernels.model`
    :func:`materialize`: a whole model's compressed layers swapped onto kernels in place, with a
    :class:`MaterializeReport` (per layer a :class:`LayerKernel`: the choice, the module, resident bytes).

The names below are re-exported here; ``from autocomp.deploy.kernels import materialize`` is the
usual import.
"""

from autocomp.deploy.kernels.choose import (
    FALLBACK_KERNEL,
    KERNELS,
    KernelChoice,
    KernelRequest,
    KernelSpec,
    choose_kernel,
    compute_dtype,
    format_label,
    int4_op_group,
)
from autocomp.deploy.kernels.model import LayerKernel, MaterializeReport, materialize
from autocomp.deploy.kernels.modules import (
    KERNEL_MODULES,
    DenseLinear,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    KernelLinear,
    QuantizedEmbedding,
    SemiStructured24Linear,
    check_codes_reproduce,
    dequantize,
    exact_zero_codes,
)

__all__ = [
    "FALLBACK_KERNEL",
    "KERNELS",
    "KERNEL_MODULES",
    "DenseLinear",
    "Int4WeightOnlyLinear",
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "KernelChoice",
    "KernelLinear",
    "KernelRequest",
    "KernelSpec",
    "LayerKernel",
    "MaterializeReport",
    "QuantizedEmbedding",
    "SemiStructured24Linear",
    "check_codes_reproduce",
    "choose_kernel",
    "compute_dtype",
    "dequantize",
    "exact_zero_codes",
    "format_label",
    "int4_op_group",
    "materialize",
]
