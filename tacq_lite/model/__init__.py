"""Model structure: finding and replacing linears (walk), loading models (loading), the packed
QuantLinear layer (qlinear) and the on-disk format of a quantized model (checkpoint).
"""
