"""Fused Triton kernels with pure-torch references (the test oracle and the CPU path)."""
import warnings

# `python -m kernels.weighted_mse` (the benchmark) imports this package first, so runpy warns that
# the submodule is already loaded; harmless here, since the benchmark only uses the module's own names
warnings.filterwarnings("ignore", r"'kernels\..*' found in sys\.modules", RuntimeWarning)

# note: the function kernels.weighted_mse shadows the submodule of the same name on the package;
# reach module internals with `from kernels.weighted_mse import ...`
from kernels.weighted_mse import (HAS_TRITON, row_mse, row_mse_reference, weighted_mse,
                                  weighted_mse_reference)

__all__ = ["HAS_TRITON", "row_mse", "row_mse_reference", "weighted_mse", "weighted_mse_reference"]
