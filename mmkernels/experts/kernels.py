"""The Triton kernels of the experts family, by unit. Importing this module (which
:mod:`mmkernels.tuning` does by this name) registers every experts launch kind and option."""
from . import routing_kernels as routing
from .grouped_mm import kernels as grouped_mm
from .layer_norm import kernels as layer_norm

__all__ = ["grouped_mm", "layer_norm", "routing"]
