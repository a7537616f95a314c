"""Where a model lives and computes: device and dtype names, checked, and moving one piece at a time.

`--device` is `auto` (the first CUDA GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`;
`--dtype` is `float32`, `bfloat16` or `float16`, the dtype the model's weights are loaded and
kept in. GPTQ's Hessian and solve run in float32 whatever the dtype (algo/gptq.py converts), and
TaCQ's backward passes run in float32 unless the gradient dtype says otherwise.

Sequential onloading: the decoder layers stay where the model was loaded (the host); a pass
moves one layer at a time to the compute device (`onloaded`) and back, so a GPU needs room for one
layer and its activations, not for the model.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device_name(name: str) -> str:
    """The name itself if it is one tacq_lite understands (whatever this machine has), else ValueError."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"device={name!r} is unknown; choose auto, cpu, cuda or cuda:N (N = a GPU index).")
    return name


def resolve_device(name: str) -> torch.device:
    """The torch.device that `name` means on this machine; a GPU that is not there is a ValueError.

    `auto` is the first CUDA GPU when one is visible, else the CPU. `cuda` never falls back to
    the CPU silently: asking for a GPU on a machine without one is an error.
    """
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU visible to torch "
                         f"(torch {torch.__version__}); use --device cpu or --device auto.")
    index = int(name.split(":")[1]) if ":" in name else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); pick one of those.")
    return torch.device("cuda", index)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is unknown; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def check_dtype_on(dtype: torch.dtype, device: torch.device) -> None:
    """float16 matmuls on the CPU are missing or very slow in many torch builds: refuse them up front."""
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype float16 on the CPU: many CPU kernels lack float16 or run it far slower; "
                         "use --dtype bfloat16 (or float32) on the CPU, float16 on a GPU.")


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | None):
    """Move `module` to `device` for the duration, then back where it was.

    device None, or the device it is already on: nothing moves (and nothing is copied). Moving
    keeps the dtype; parameters are replaced, not copied, so no second copy stays behind.
    """
    home = module_device(module)
    if device is None or torch.device(device) == home:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None):
    """The whole model on `device` in `dtype` (None: as it is) for the duration, then back.

    Parameters and buffers are converted in place. Each floating tensor goes back to the dtype it
    had, bit for bit: from bfloat16 or float16 to float32 and back is exact; for a narrowing
    conversion (float32 to bfloat16) the original tensors are kept aside and put back, which costs
    their memory for the duration. Nothing moves when it is already there.
    """
    slots = [(m, store, name) for m in model.modules() for store in (m._parameters, m._buffers)
             for name, t in store.items() if t is not None]
    home = [(store[name].device, store[name].dtype) for _m, store, name in slots]
    if all(dev == device and (dtype is None or dt == dtype or not dt.is_floating_point) for dev, dt in home):
        yield model
        return
    # A narrowing conversion (float32 -> bfloat16) is not exact both ways: those tensors' originals
    # are kept aside (where they are) and put back; a widening one is, and nothing is kept.
    narrowed = {i: (store[name].data if isinstance(store[name], nn.Parameter) else store[name])
                for i, (_m, store, name) in enumerate(slots)
                if dtype is not None and store[name].is_floating_point() and store[name].element_size() >
                dtype.itemsize}
    model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)
    try:
        yield model
    finally:
        for i, ((_m, store, name), (dev, dt)) in enumerate(zip(slots, home)):
            t = store[name]
            back = narrowed[i] if i in narrowed else None
            if isinstance(t, nn.Parameter):  # the same Parameter object: ties and references survive
                t.data = back if back is not None else t.data.to(dev, dt)
            else:
                store[name] = back if back is not None else t.to(dev, dt)


def outside_layers(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The model's modules that hold parameters or buffers and are not inside a decoder layer
    (embeddings, rotary tables, final norm, LM head): what must sit on the compute device to run
    the model up to its first layer."""
    inside = {id(m) for m in layers.modules()}
    out = []
    for m in model.modules():
        if id(m) in inside or any(id(c) == id(layers) for c in m.modules()):
            continue  # inside a layer, or an ancestor of them (moving it would move every layer)
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            out.append(m)
    return out


def device_info(device: torch.device) -> dict:
    """What a JSON record says about the compute device: its name, and for CUDA total and peak memory."""
    if device.type != "cuda":
        import platform

        return {"device": str(device), "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "name": props.name, "total_memory_gib": props.total_memory / 2**30,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "threads": torch.get_num_threads()}
