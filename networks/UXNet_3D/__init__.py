from .network_backbone import UXNET
from .uxnet_encoder import UXNET_KERNEL, UXNetBlock, UXNetEncoder

__all__ = ["UXNET", "UXNET_KERNEL", "UXNetBlock", "UXNetEncoder"]
