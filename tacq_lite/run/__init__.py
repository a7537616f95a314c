"""Model passes and the TaCQ recipe: RTN and GPTQ over a whole model (passes), the score cache
(score_cache), the two-process gradient worker (parallel), TaCQ's five steps (tacq), one
experiment from config to record (experiment), full precision / GPTQ / TaCQ side by side (demo),
the byte budget (budget) and gradients over several processes (distributed).
"""
