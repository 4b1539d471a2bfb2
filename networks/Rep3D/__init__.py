from .lrbm import (
    MODULATIONS,
    KernelModulation,
    LRBMConfig,
    LRBMGenerator,
    ModulatedDepthwiseConv3d,
    compute_distance_prior,
    modulated_kernel,
)
from .network_backbone import REP3D
from .rep3d_encoder import Rep3DBlock, Rep3DEncoder
