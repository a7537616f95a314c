# Triton's interpreter must be switched on before triton is imported anywhere.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (after TRITON_INTERPRET)

# Unit tests run tiny tensors: one thread avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)
