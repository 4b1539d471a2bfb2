"""Effective receptive fields and kernel statistics of trained or fresh networks.

The command line of :mod:`rep3d.commands.erf` (also installed as ``rep3d-erf``); the analysis is
:mod:`rep3d.analysis`."""

from __future__ import annotations

import sys

from rep3d.analysis.erf import (
    AREA_THRESHOLDS,
    area_ratios,
    centre_of_mass,
    effective_receptive_fields,
    plot_erf,
    plot_kernels,
    radial_profile,
    summarise_erf,
)
from rep3d.analysis.kernels import (
    CENTRE_FRACTION,
    PERIPHERY_FRACTION,
    KernelDynamics,
    depthwise_convs,
    effective_kernel,
    encoder_stages,
    kernel_regions,
    kernel_statistics,
    modulation_of,
    plot_kernel_dynamics,
)
from rep3d.analysis.study import (
    ErfConfig,
    analyse_source,
    run_analysis,
)
from rep3d.commands.erf import (
    build_parser,
    main,
)

__all__ = [
    "AREA_THRESHOLDS",
    "CENTRE_FRACTION",
    "ErfConfig",
    "KernelDynamics",
    "PERIPHERY_FRACTION",
    "analyse_source",
    "area_ratios",
    "build_parser",
    "centre_of_mass",
    "depthwise_convs",
    "effective_kernel",
    "effective_receptive_fields",
    "encoder_stages",
    "kernel_regions",
    "kernel_statistics",
    "main",
    "modulation_of",
    "plot_erf",
    "plot_kernel_dynamics",
    "plot_kernels",
    "radial_profile",
    "run_analysis",
    "summarise_erf",
]

if __name__ == "__main__":
    sys.exit(main())
