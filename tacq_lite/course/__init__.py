"""Course tools: exercise checkers (exercises), student copies of the notebooks (student),
interactive plots (explore) and papermill sweeps over a notebook's parameters (sweep).
"""
