"""Model passes and the TaCQ recipe: RTN and GPTQ over a whole model (passes), the score cache
(score_cache), the two-process gradient worker (parallel), TaCQ's five steps (tacq) and one
experiment from config to record (experiment).
"""
