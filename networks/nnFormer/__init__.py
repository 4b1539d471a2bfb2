from .nnFormer import nnFormer

__all__ = ["nnFormer"]
