"""Where a model lives and computes: device and dtype names, checked, and moving one piece at a time.

`--device` is `auto` (the first CUDA GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`;
`--dtype` is `float32`, `bfloat16` or `float16`, the dtype the model's weights are loaded and
kept in. GPTQ's Hessian and solve run in float32 whatever the dtype (algo/gptq.py converts), and
TaCQ's backward passes run in float32 unless the gradient dtype says otherwise.

Sequential onloading: the decoder layers stay where the model was loaded (the host); a pass
moves one layer at a time to the compute device (`onloaded`) and back, so a GPU needs room for one
layer and its activations, not for the model.

A device_map (accelerate's, given to transformers' `from_pretrained`: "auto", "balanced",
"balanced_low_0", "sequential", or {module name: device}) is the other way, for a model larger than
one GPU but not than several: each decoder layer is loaded on its own device and stays there. The
two are exclusive. A model loaded with a device_map is never moved: every pass computes each layer
on the device its weights are on (`compute_device` is None), GPTQ's Hessian of a linear sits on
that linear's device, the gradient accumulators beside each weight, and activations travel from
layer to layer (`to_device`). Every module must be on a GPU or every module on the CPU: accelerate
offloads the CPU part of a mixed map (and every "disk" entry) to the meta device, where weights
cannot be quantized in place.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, via transformers
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


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


# ---------------------------------------------------------------- device maps


def check_device_map(device_map) -> str | dict[str, str]:
    """device_map in one form (whatever this machine has): a strategy name, or {module name: device
    name} with accelerate's GPU numbers N written "cuda:N" and a lone device name as {"": name}.
    Anything else, a "disk"/"meta" entry or a map mixing the CPU with GPUs, is a ValueError."""
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_STRATEGIES:
            return device_map
        if _DEVICE.fullmatch(device_map):
            return {"": device_map}
        raise ValueError(f"device_map={device_map!r} is unknown; give one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                         'or a {module: device} map such as {"model.embed_tokens": "cuda:0", "model.layers.0": '
                         '"cuda:0", ...} (CLI: a JSON object, or a .json file holding one).')
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"device_map must be a strategy name ({', '.join(DEVICE_MAP_STRATEGIES)}) or a non-empty "
                         f"{{module: device}} map, got {type(device_map).__name__}.")
    out = {}
    for module, dev in device_map.items():
        if isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0:
            dev = f"cuda:{dev}"  # accelerate's and transformers' GPU numbers
        dev = str(dev) if isinstance(dev, torch.device) else dev
        if not isinstance(module, str) or not isinstance(dev, str) or not _DEVICE.fullmatch(dev):
            raise ValueError(f"device_map puts {module!r} on {dev!r}; every module must go to cpu, cuda or cuda:N "
                             "(tacq_lite quantizes weights in place, so nothing can be offloaded to disk or meta).")
        out[module] = dev
    if {d.split(":")[0] for d in out.values()} == {"cpu", "cuda"}:
        on_cpu = next(m for m, d in out.items() if d == "cpu")
        raise ValueError(f"device_map puts {on_cpu or 'the rest'!r} on the CPU next to GPUs; accelerate would offload "
                         "it to the meta device, where it cannot be quantized in place. Map every module to a GPU, "
                         "or leave the device_map out and use --device cuda (one layer at a time on the GPU).")
    return out


def resolve_device_map(device_map) -> str | dict[str, str]:
    """check_device_map's form, with every GPU it names checked on this machine ("cuda" -> "cuda:0")."""
    device_map = check_device_map(device_map)
    if isinstance(device_map, str):  # accelerate picks the devices: the visible GPUs, else the CPU
        return device_map
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = {}
    for module, dev in device_map.items():
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if dev != "cpu" and count == 0:
            raise ValueError(f"device_map puts {module or 'the model'!r} on {dev}, but this machine has no CUDA GPU "
                             f"visible to torch (torch {torch.__version__}); map it to cpu or leave --device-map out.")
        if dev != "cpu" and index >= count:
            raise ValueError(f"device_map puts {module or 'the model'!r} on {dev}, but this machine has {count} CUDA "
                             f"GPU{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); "
                             "map it to one of those.")
        out[module] = dev if dev == "cpu" else f"cuda:{index}"
    return out


def map_devices(device_map) -> list[torch.device]:
    """The devices a (resolved) device_map can put weights on: its own, or for a strategy every
    visible GPU (the CPU where there is none)."""
    if isinstance(device_map, str):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    return sorted({torch.device(d) for d in device_map.values()}, key=_order)


def check_map_covers(device_map: Mapping[str, str], names: Iterable[str], optional: Iterable[str] = ()) -> None:
    """ValueError unless every tensor name in `names` (the state_dict keys) falls under a module of the
    map and every module of the map holds a tensor (of `names` or `optional`, e.g. the rotary table's
    buffers, which a map may place but need not): a missing module would be loaded on the CPU
    silently, a misspelt one would place nothing."""
    names = list(names)
    held = names + list(optional)

    def under(name: str, module: str) -> bool:
        return module == "" or name == module or name.startswith(module + ".")

    unused = [m for m in device_map if not any(under(n, m) for n in held)]
    if unused:
        top = sorted({n.rsplit(".", 2)[0] if n.count(".") > 2 else n.rsplit(".", 1)[0] for n in names})[:4]
        raise ValueError(f"device_map names {unused[0]!r}, which holds no weight of this model; check the spelling "
                         f"(its modules are named like {', '.join(top)}).")
    uncovered = [n for n in names if not any(under(n, m) for m in device_map)]
    if uncovered:
        raise ValueError(f"device_map gives no device to {len(uncovered)} of the model's tensors, e.g. {uncovered[0]}; "
                         f"add its module ({uncovered[0].rsplit('.', 1)[0]!r}) or a parent of it, or \"\" for "
                         "everything not named.")


def hf_device_map(model: nn.Module) -> dict[str, str] | None:
    """{module: device} of a model dispatched over several devices by a device_map, else None.
    (transformers sets `hf_device_map` only when the map names more than one device.)"""
    found = getattr(model, "hf_device_map", None)
    if not found:
        return None
    return {m: f"cuda:{d}" if isinstance(d, int) else str(d) for m, d in found.items()}


def device_map_record(model: nn.Module) -> dict[str, str]:
    """{module: device} of a model loaded with a device_map, for a run's record: its hf_device_map, or
    {"": the device} when the map named one device (transformers then dispatches nothing)."""
    return hf_device_map(model) or {"": str(module_device(model))}


def is_split(model: nn.Module) -> bool:
    """Whether a device_map spread `model` over several devices: then nothing may move it."""
    return len(set((hf_device_map(model) or {}).values())) > 1


def model_devices(module: nn.Module) -> list[torch.device]:
    """The devices holding the module's parameters: cpu, then cuda:0, cuda:1, ... ([cpu] without any)."""
    return sorted({p.device for p in module.parameters()}, key=_order) or [torch.device("cpu")]


def _order(device: torch.device) -> tuple[str, int]:
    return device.type, -1 if device.index is None else device.index


def check_mapped(model: nn.Module) -> None:
    """After loading with a device_map: ValueError if accelerate offloaded any weight (it is then on
    the meta device, or the map puts modules on the CPU or disk beside GPUs)."""
    offloaded = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    kinds = {d.split(":")[0] for d in (hf_device_map(model) or {}).values()}
    if offloaded is not None or "disk" in kinds or {"cpu", "cuda"} <= kinds:
        where = offloaded or next(m for m, d in hf_device_map(model).items() if d in ("cpu", "disk"))
        raise ValueError(f"the device_map offloaded {where} to the CPU or disk (the GPUs were too small for the "
                         "model), which cannot be quantized in place; give more GPUs, or leave --device-map out "
                         "and use --device cuda (one layer at a time on the GPU).")


def compute_device(model: nn.Module, device: str, device_map=None) -> torch.device | None:
    """Where the passes compute: None (each layer on the device its weights are on; nothing moves)
    for a model loaded with a device_map (`device_map` given, or one that spread the model over
    devices); else resolve_device(device), to which the passes onload one layer at a time."""
    if device_map is not None or is_split(model):
        return None
    return resolve_device(device)


def to_device(obj, device: torch.device):
    """obj with every tensor in it (also inside tuples, lists and dicts) on `device`; the rest as is.
    A tensor already there is not copied."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple takes its fields one by one
        return type(obj)(*(to_device(x, device) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: its input embedding's device (its first parameter's without one)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return emb.weight.device if isinstance(getattr(emb, "weight", None), torch.Tensor) else module_device(model)


# ---------------------------------------------------------------- moving


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
def placed(model: nn.Module, device: torch.device | None, dtype: torch.dtype | None = None):
    """The whole model on `device` in `dtype` (None: as it is) for the duration, then back.

    device None: every tensor stays on its device (a model loaded with a device_map), only the
    dtype changes. A model spread over devices by a device_map cannot be moved: ValueError.

    Parameters and buffers are converted in place. Each floating tensor goes back to the dtype it
    had, bit for bit: from bfloat16 or float16 to float32 and back is exact; for a narrowing
    conversion (float32 to bfloat16) the original tensors are kept aside and put back, which costs
    their memory for the duration. Nothing moves when it is already there.
    """
    if device is not None and is_split(model):
        raise ValueError(f"the model is spread over {', '.join(map(str, model_devices(model)))} by a device_map and "
                         "cannot be moved to one device; compute where its weights are (device None).")
    slots = [(m, store, name) for m in model.modules() for store in (m._parameters, m._buffers)
             for name, t in store.items() if t is not None]
    home = [(store[name].device, store[name].dtype) for _m, store, name in slots]
    if all((device is None or dev == device) and (dtype is None or dt == dtype or not dt.is_floating_point)
           for dev, dt in home):
        yield model
        return
    # A narrowing conversion (float32 -> bfloat16) is not exact both ways: those tensors' originals
    # are kept aside (where they are) and put back; a widening one is, and nothing is kept.
    narrowed = {i: (store[name].data if isinstance(store[name], nn.Parameter) else store[name])
                for i, (_m, store, name) in enumerate(slots)
                if dtype is not None and store[name].is_floating_point() and store[name].element_size() >
                dtype.itemsize}
    model.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
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
