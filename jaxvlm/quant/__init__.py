"""Quantized weight types: NF4 and Int8, bit-compatible with bitsandbytes."""
from jaxvlm.quant.int8 import Int8, quantize_int8
from jaxvlm.quant.nf4 import NF4, dequantize_nf4, nf4_from_bnb, nf4_to_bnb, quantize_nf4

__all__ = ["Int8", "NF4", "dequantize_nf4", "nf4_from_bnb", "nf4_to_bnb", "quantize_int8", "quantize_nf4"]
