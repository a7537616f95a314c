"""Per-layer algorithms, one layer or one score at a time: GPTQ with an optional keep-mask (gptq),
per-sample gradient sums (gradients), the importance scores (selectors) and the global top-k that
turns scores into a keep-mask (select).
"""
