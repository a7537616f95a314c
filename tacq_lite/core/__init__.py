"""Pure tensor primitives: the quantization grid (quant), bit packing (pack), size accounting (bits).

Nothing here knows about models, data or TaCQ; everything above builds on these.
"""
