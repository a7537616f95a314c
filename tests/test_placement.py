"""Devices, dtypes and the memory changes of issue 21, on the CPU: sequential onloading, the first GPTQ
pass without a model copy, scoring one linear at a time, KL from log-probabilities on disk, saving
without a copy, and the bad-input messages of --device / --dtype."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from fakes import cli_error_before_loading

from tacq_lite import cli
from tacq_lite.config import QuantConfig
from tacq_lite.eval.lm import ReferenceLogprobs, evaluate_lm
from tacq_lite.model import placement, walk
from tacq_lite.model.loading import tiny_llama
from tacq_lite.run import experiment, passes
from tacq_lite.run.score_cache import CACHE_DTYPE
from tacq_lite.run.tacq import build_masks, compute_importance, tacq_quantize

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
CUDA = torch.cuda.is_available()


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- names and bad input

def test_device_and_dtype_names_are_checked():
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert placement.check_device_name(good) == good
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps:0", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            placement.check_device_name(bad)
    with pytest.raises(ValueError, match="device='gpu'"):
        QuantConfig(device="gpu")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        QuantConfig(dtype="float64")
    with pytest.raises(ValueError, match="grad_dtype"):
        QuantConfig(grad_dtype="float16")
    assert placement.resolve_dtype("bfloat16") == torch.bfloat16
    assert placement.resolve_device("cpu") == torch.device("cpu")
    assert placement.resolve_device("auto") == (torch.device("cuda:0") if CUDA else torch.device("cpu"))


@pytest.mark.skipif(CUDA, reason="checks the messages of a machine without a GPU")
@pytest.mark.parametrize("argv, phrase", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "cuda:7"], "no CUDA GPU"),
    (["--dtype", "float16", "--device", "cpu"], "float16 on the CPU"),
    (["--device", "tpu"], "device='tpu' is unknown"),
])
def test_bad_device_or_dtype_is_one_line_before_loading(argv, phrase, capsys, monkeypatch):
    assert phrase in cli_error_before_loading(["quantize", "--method", "rtn", "--quiet", *argv], capsys, monkeypatch)


def test_gpu_index_beyond_the_machine_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"cuda:7: this machine has 1 CUDA GPU \(cuda:0\)"):
        placement.resolve_device("cuda:7")
    assert placement.resolve_device("cuda") == torch.device("cuda", 0)


# ---------------------------------------------------------------- moving and converting

def test_placed_converts_in_place_and_returns_bit_for_bit():
    model = tiny_llama().to(torch.bfloat16)
    before = weights(model)
    embed = model.model.embed_tokens.weight
    with placement.placed(model, torch.device("cpu"), torch.float32):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives
    assert model.model.embed_tokens.weight is embed  # the same Parameter object, not a copy
    assert same(before, weights(model)) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    with placement.placed(model, torch.device("cpu")):  # nothing to do: nothing moves
        assert model.model.embed_tokens.weight.data_ptr() == embed.data_ptr()


def test_outside_layers_are_what_runs_before_layer_0():
    model = tiny_llama()
    names = {type(m).__name__ for m in placement.outside_layers(model, walk.decoder_layers(model))}
    assert {"Embedding", "LlamaRotaryEmbedding", "LlamaRMSNorm"} <= names
    assert not any(isinstance(m, type(walk.decoder_layers(model)[0])) for m in
                   placement.outside_layers(model, walk.decoder_layers(model)))


# ---------------------------------------------------------------- the passes

@pytest.mark.parametrize("staged", [None, False])
def test_onloading_gives_the_in_memory_result(staged):
    """Layers on the CPU, computed on the CPU through the onloading path, equal the plain pass bit for bit."""
    config = QuantConfig(method="gptq", bits=3, n_calib=4, seq_len=32, mse=False)
    plain, onloaded = tiny_llama(), tiny_llama()
    a = passes.gptq_quantize(plain, WINDOWS, config, progress=False)
    b = passes.gptq_quantize(onloaded, WINDOWS, config, device=torch.device("cpu"), progress=False)
    assert same(weights(plain), weights(onloaded)) and a.loss == b.loss
    assert all(torch.equal(a.codes[n], b.codes[n]) for n in a.codes)


def test_first_pass_restores_the_model_and_equals_a_copy():
    """TaCQ's first pass on the model itself (restore=True) gives the Q(W) − W a quantized copy gives."""
    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False)
    model = tiny_llama()
    before = weights(model)
    twin = copy.deepcopy(model)
    passes.gptq_quantize(twin, WINDOWS, config, progress=False)
    first = passes.gptq_quantize(model, WINDOWS, config, restore=True, error_dtype=CACHE_DTYPE, progress=False)
    assert same(before, weights(model))  # every layer got its full-precision weights back
    twin_lin = walk.named_linears(twin)
    for name, lin in walk.named_linears(model).items():
        want = (twin_lin[name].weight.float() - lin.weight.float()).to(CACHE_DTYPE)
        assert torch.equal(first.errors[name], want), name
    rtn = passes.rtn_errors(model, config, dtype=torch.float32)
    rtn_twin = copy.deepcopy(model)
    passes.rtn_quantize(rtn_twin, config)
    for name, lin in walk.named_linears(rtn_twin).items():
        assert torch.equal(rtn[name], lin.weight - walk.named_linears(model)[name].weight)


@pytest.mark.parametrize("selector", ["tacq", "random", "owq_columns"])
def test_scoring_one_linear_at_a_time_equals_all_at_once(selector, tmp_path):
    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False, ratio=0.02, selector=selector,
                         cache_dir=str(tmp_path), parallel=False)
    model = tiny_llama()
    lazy = compute_importance(model, WINDOWS, config, progress=False, materialize=False)
    full = compute_importance(model, WINDOWS, config, progress=False, materialize=True)
    assert isinstance(full.W, dict) and not isinstance(lazy.W, dict)
    a = build_masks(lazy, selector=selector, ratio=0.02, seed=3)
    b = build_masks(full, selector=selector, ratio=0.02, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert sum(int(m.sum()) for m in a.values()) > 0


def test_bfloat16_model_runs_tacq_with_float32_gradients(tmp_path):
    """A bf16 model: GPTQ solves in fp32, the backward passes run in fp32, the model comes back bf16."""
    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False, ratio=0.01, dtype="bfloat16",
                         cache_dir=str(tmp_path), parallel=False)
    model = tiny_llama().to(torch.bfloat16)
    result = tacq_quantize(model, WINDOWS, config, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(result.n_kept.values()) == result.info["k"] > 0
    for name, lin in walk.named_linears(model).items():  # kept weights hold 16-bit values, the rest a grid point
        assert torch.isfinite(lin.weight).all(), name


# ---------------------------------------------------------------- KL without a second model

def test_reference_logprobs_on_disk_give_the_same_kl_bit_for_bit(tmp_path):
    ref, model = tiny_llama(seed=0), tiny_llama(seed=1)
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(2))
    with ReferenceLogprobs(ref, tokens, seq_len=48, folder=str(tmp_path), progress=False) as stored:
        files = list(Path(stored._dir.name).iterdir())
        assert len(files) == 4 and stored.nbytes >= 4 * 47 * 256 * 4
        a = evaluate_lm(model, tokens, seq_len=48, reference=stored, progress=False)
        with pytest.raises(ValueError, match="other windows"):
            evaluate_lm(model, tokens[1:], seq_len=48, reference=stored, progress=False)
    b = evaluate_lm(model, tokens, seq_len=48, reference=ref, progress=False)
    assert a == b and a.kl > 0
    assert not any(f.exists() for f in files) and list(tmp_path.iterdir()) == []  # closed: its folder is gone


def test_run_quantize_keeps_no_second_model_and_records_the_environment(tmp_path, monkeypatch):
    from test_failure_modes import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join("the of and a to in is".split() * 120))
    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or real_deepcopy(obj, *a))
    config = QuantConfig(model=str(folder), method="tacq", bits=3, n_calib=2, seq_len=32, mse=False, ratio=0.01,
                         evals=(str(text),), eval_tokens=256, cache_dir=str(tmp_path / "cache"), device="cpu")
    record = experiment.run_quantize(config, save=str(tmp_path / "q"), progress=False, log=lambda *_: None)
    assert not [c for c in copies if "ForCausalLM" in c or "Model" in c]  # no copy of the model was made
    m = record["metrics"][str(text)]
    assert m["kl"] > 0 and m["ref_ppl"] > 0 and record["reference_bytes_on_disk"] > 0
    env = record["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] == torch.__version__ and env["threads"] >= 1
    assert {"transformers", "triton", "tacq_lite"} <= set(env["versions"]) and "command" in env and "git_commit" in env
    saved = json.loads((tmp_path / "q" / "tacq_lite.json").read_text())
    assert saved["info"]["config"]["device"] == "cpu"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tacq_lite-reference")]


# ---------------------------------------------------------------- on a GPU (skipped without one)

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_onloading_matches_the_cpu_pass():
    """Layers on the host, computed on the GPU: close to the CPU pass (kernels round differently)."""
    config = QuantConfig(method="gptq", bits=4, n_calib=4, seq_len=32, mse=False)
    cpu, gpu = tiny_llama(), tiny_llama()
    passes.gptq_quantize(cpu, WINDOWS, config, progress=False)
    passes.gptq_quantize(gpu, WINDOWS, config, device=torch.device("cuda"), progress=False)
    assert all(p.device.type == "cpu" for p in gpu.parameters())  # the layers went back to the host
    a, b = weights(cpu), weights(gpu)
    agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert agree > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_tacq_end_to_end(tmp_path):
    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False, ratio=0.01, device="cuda",
                         dtype="bfloat16", cache_dir=str(tmp_path))
    model = tiny_llama().to(torch.bfloat16)
    result = experiment.quantize_model(model, WINDOWS, config, progress=False)
    assert result.bits.n_kept > 0
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.device.type == "cpu" for m in result.masks.values())  # beside the layers: packing needs them
    meta = experiment.save_packed(model, None, result, str(tmp_path / "q"))
    assert meta["bytes"]["quantized_linears"] > 0


def test_spilled_tensors_round_trip_and_fall_back_to_memory(tmp_path, monkeypatch):
    from tacq_lite.io import SpilledTensors

    store = SpilledTensors(folder=tmp_path)
    a = torch.randn(3, 4).to(torch.bfloat16)
    store["a"], store["b"] = a, torch.arange(5.0)
    folder = next(tmp_path.iterdir())
    assert len(list(folder.iterdir())) == 2 and list(store) == ["a", "b"]
    assert torch.equal(store["a"], a) and store["a"].data_ptr() != a.data_ptr()  # read back, not kept
    assert torch.equal(store.pop("b"), torch.arange(5.0)) and len(list(folder.iterdir())) == 1

    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*_a, **_k):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.warns(UserWarning, match="No space left.*in memory"):
        store["c"] = torch.ones(2)
    assert torch.equal(store["c"], torch.ones(2)) and len(list(folder.iterdir())) == 1
    store.close()
    assert not folder.exists()


def test_first_pass_errors_go_to_disk_and_give_the_same_q_w(tmp_path, monkeypatch):
    """compute_importance spills Q(W) − W during the first pass, reads it back, and deletes the spill."""
    from tacq_lite.io import SpilledTensors
    from tacq_lite.run import tacq

    made = []

    class Recorded(SpilledTensors):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(tacq, "SpilledTensors", Recorded)
    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False, ratio=0.02, parallel=False)
    spilled = compute_importance(tiny_llama(), WINDOWS, config, progress=False, cache=False)
    first = passes.gptq_quantize(tiny_llama(), WINDOWS, config, restore=True, error_dtype=CACHE_DTYPE,
                                 progress=False)
    assert all(torch.equal(spilled.QW[n], spilled.W[n] + first.errors[n].float()) for n in first.errors)
    assert len(made) == 1 and not Path(made[0]._dir.name).exists()  # read back, then deleted


def test_a_run_the_byte_budget_says_cannot_fit_stops_before_loading(tmp_path, monkeypatch, capsys):
    from test_failure_modes import save_tiny_model

    from tacq_lite.run import budget

    folder = save_tiny_model(tmp_path / "model")
    capsys.readouterr()  # the saving's progress bars

    def no_load(*_a, **_k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("tacq_lite.model.loading.load_model", no_load)
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 0)  # a machine with no memory left
    monkeypatch.setattr(budget, "PROCESS_BYTES", 1)
    rc = cli.main(["quantize", "--model", str(folder), "--method", "tacq", "--n-calib", "2", "--seq-len", "32",
                   "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "stage" in err and "GiB of host memory" in err and err.count("\n") == 1


def test_a_narrowing_placement_gives_the_original_weights_back():
    """float32 -> bfloat16 for the backward passes is not exact both ways: the originals come back."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1 + 2**-20  # not a bfloat16 number
    before = weights(model)
    with placement.placed(model, torch.device("cpu"), torch.bfloat16):
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert same(before, weights(model)) and model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_an_interrupted_first_pass_leaves_the_model_as_it_was(monkeypatch):
    from tacq_lite.algo import gptq

    calls = {"n": 0}
    real = gptq.GPTQ.quantize

    def stop_on_the_ninth(self, **kw):  # inside layer 1, after layer 0 was restored
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(self, **kw)

    monkeypatch.setattr(gptq.GPTQ, "quantize", stop_on_the_ninth)
    model = tiny_llama()
    before = weights(model)
    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False)
    with pytest.raises(KeyboardInterrupt):
        passes.gptq_quantize(model, WINDOWS, config, restore=True, progress=False)
    assert same(before, weights(model))


def test_spilled_tensor_names_never_share_a_file(tmp_path):
    from tacq_lite.io import SpilledTensors

    store = SpilledTensors(folder=tmp_path)
    store["a"], store["b"] = torch.zeros(2), torch.ones(2)
    del store["a"]
    store["c"] = torch.full((2,), 7.0)
    store["b"] = torch.full((2,), 3.0)  # set again: the old file goes
    assert torch.equal(store["b"], torch.full((2,), 3.0)) and torch.equal(store["c"], torch.full((2,), 7.0))
    assert len(list(next(tmp_path.iterdir()).iterdir())) == 2
    store.close()


def test_a_bfloat16_model_saves_packed_and_loads_back(tmp_path):
    """Its weights hold each grid value rounded to bfloat16: packing checks them in that dtype."""
    from tacq_lite.model.checkpoint import load_quantized

    config = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False, ratio=0.01, dtype="bfloat16",
                         device="cpu", parallel=False, cache_dir=str(tmp_path / "c"))
    model = tiny_llama().to(torch.bfloat16)
    result = experiment.quantize_model(model, WINDOWS, config, progress=False)
    experiment.save_packed(model, None, result, str(tmp_path / "q"))
    loaded = load_quantized(str(tmp_path / "q"))[0]
    with torch.no_grad():
        want, got = model(WINDOWS[:1]).logits.float(), loaded(WINDOWS[:1]).logits.float()
    assert (want - got).abs().max() < 0.02 * want.abs().max()  # fp16 scales and zeros on disk


def test_streamed_safetensors_are_what_safetensors_reads(tmp_path):
    """io.write_safetensors writes one tensor at a time; safetensors' own reader gets every tensor back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tacq_lite.io import write_safetensors

    tensors = {"G/a": torch.randn(3, 5).to(torch.bfloat16), "E/b": torch.randn(7), "c": torch.arange(6).view(2, 3),
               "m": torch.rand(4) > 0.5, "h": torch.randn(2, 2).half()}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"key": "value"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], t) for n, t in tensors.items())
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"key": "value"}
