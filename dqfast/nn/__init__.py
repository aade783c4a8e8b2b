"""Modules built on the dqfast ops."""

from dqfast.nn.c2f_attention import C2FAttention, KVCache
from dqfast.nn.dynamic_quantizer import DynamicQuantizer, DynamicQuantizerOutput, GranularityRouter
from dqfast.nn.subpixel_conv import SubPixelConv2d

__all__ = [
    "C2FAttention",
    "DynamicQuantizer",
    "DynamicQuantizerOutput",
    "GranularityRouter",
    "KVCache",
    "SubPixelConv2d",
]
