from .network_backbone import UXNET
from .uxnet_encoder import UXNetBlock, UXNetEncoder

__all__ = ["UXNET", "UXNetBlock", "UXNetEncoder"]
