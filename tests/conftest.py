# Triton's interpreter must be switched on before triton is imported anywhere.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (after TRITON_INTERPRET)

# Unit tests run tiny tensors: one thread avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded_gguf():
    """The embedded model's GGUF file; skips, with the install command, where its wheel is missing."""
    from tacq_lite.model import loading

    try:
        return loading.embedded_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
