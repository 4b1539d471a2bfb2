from .TransBTS import TransBTS

__all__ = ["TransBTS"]
