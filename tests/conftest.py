# Triton's interpreter must be switched on before triton is imported anywhere.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
