"""accelerate's device_map (issue 21): a model split over devices, each layer computed where its weights are.

On the CPU: a tiny Llama loaded with a per-module map that is all "cpu" (and one dispatched with
accelerate's hooks) gives G, Q(W) and the final TaCQ weights bit for bit equal to the plain model's;
a bad map is a one-line error before any weight is read. With two GPUs (skipped elsewhere): the split
model's G and quantized weights match the one-device run, and each accumulator sits on its weight's
device; with one GPU, a model split over the CPU and the GPU by accelerate's hooks does the same.
"""
import json

import pytest
import torch
from fakes import cli_error_before_loading
from test_failure_modes import save_tiny_model

from tacq_lite import cli
from tacq_lite.algo.gradients import accumulate_gradients
from tacq_lite.config import QuantConfig
from tacq_lite.model import placement, walk
from tacq_lite.model.loading import load_model, tiny_llama
from tacq_lite.run import experiment, passes
from tacq_lite.run.tacq import compute_importance, tacq_quantize

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
# Every tensor of tiny_llama's state_dict, by module; lm_head is tied to the embedding table but is a key too.
MODULES = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head")
CPU_MAP = dict.fromkeys(MODULES, "cpu")
# Two GPUs: layer 1 and the final norm on the second; the tied head stays with the embedding table.
TWO_GPU_MAP = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "cuda:1",
               "model.norm": "cuda:1", "lm_head": "cuda:0"}
TACQ = QuantConfig(method="tacq", bits=3, n_calib=4, seq_len=32, mse=False, ratio=0.02, parallel=False)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def mapped_with_hooks(folder, device_map, main_device="cpu"):
    """The model dispatched by accelerate itself, hooks and all (transformers adds none for one device)."""
    from accelerate import dispatch_model

    model, _ = load_model(str(folder))
    return dispatch_model(model, device_map, main_device=main_device, force_hooks=True)


# ---------------------------------------------------------------- the CPU: bit for bit

@pytest.mark.parametrize("how", ["from_pretrained", "accelerate hooks"])
def test_a_cpu_device_map_gives_the_plain_results_bit_for_bit(folder, how):
    plain, _ = load_model(str(folder))
    mapped = load_model(str(folder), device_map=CPU_MAP)[0] if how == "from_pretrained" \
        else mapped_with_hooks(folder, CPU_MAP)
    assert placement.compute_device(mapped, "auto", CPU_MAP) is None  # no onloading: computed where it is
    # G = Σ|g|, the accumulators beside each weight
    ga, gb = accumulate_gradients(plain, WINDOWS, progress=False).G, accumulate_gradients(mapped, WINDOWS,
                                                                                          progress=False).G
    assert same(ga, gb) and all(g.abs().sum() > 0 for g in gb.values())
    # Q(W) and G as TaCQ's scoring reads them
    config, mapped_config = TACQ.replace(device="cpu"), TACQ.replace(device_map=CPU_MAP)
    a = compute_importance(plain, WINDOWS, config, cache=False, progress=False)
    b = compute_importance(mapped, WINDOWS, mapped_config, cache=False, progress=False)
    assert same(a.QW, b.QW) and same(a.G, b.G) and not same(a.QW, a.W)
    # the final TaCQ weights, masks and losses
    before = weights(plain)
    ra = tacq_quantize(plain, WINDOWS, config, progress=False, cache=False)
    rb = tacq_quantize(mapped, WINDOWS, mapped_config, progress=False, cache=False)
    assert same(weights(plain), weights(mapped)) and not same(before, weights(plain))
    assert same(ra.masks, rb.masks) and ra.layer_loss == rb.layer_loss and sum(rb.n_kept.values()) > 0


def test_the_cli_runs_a_device_map_from_a_json_file_and_records_it(folder, tmp_path, capsys):
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(CPU_MAP))
    common = ["quantize", "--model", str(folder), "--method", "gptq", "--n-calib", "2", "--seq-len", "32", "--no-mse",
              "--quiet"]
    assert cli.main([*common, "--device-map", str(map_file), "--json", str(tmp_path / "mapped.json"),
                     "--save", str(tmp_path / "q")]) == 0
    assert cli.main([*common, "--device", "cpu", "--json", str(tmp_path / "plain.json")]) == 0
    capsys.readouterr()
    mapped, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("mapped", "plain"))
    assert mapped["config"]["device_map"] == CPU_MAP and plain["config"]["device_map"] is None
    assert mapped["hf_device_map"] == {"": "cpu"} and "hf_device_map" not in plain  # one device: no dispatch
    assert [d["device"] for d in mapped["environment"]["devices"]] == ["cpu"]
    assert mapped["layer_loss"] == plain["layer_loss"] and mapped["saved"]["bytes"]["quantized_linears"] > 0


@pytest.mark.slow
def test_the_embedded_model_loads_by_a_device_map_from_its_cached_copy(embedded_gguf):
    plain, _ = load_model()
    mapped, _ = load_model(device_map={"": "cpu"})
    assert same(weights(plain), weights(mapped))
    with pytest.raises(ValueError, match=r"no device to .* e\.g\. model\.layers\.0\."):
        load_model(device_map={"model.embed_tokens": "cpu"})


# ---------------------------------------------------------------- bad input: one line, before loading

@pytest.mark.parametrize("argv, phrase", [
    (["--device-map", "fastest"], "device_map='fastest' is unknown"),
    (["--device-map", '{"model.layers.0": "disk"}'], "nothing can be offloaded to disk"),
    (["--device-map", '{"model.layers.0": "cpu",'], "--device-map: the JSON does not parse"),
    (["--device-map", "/no/such/map.json"], "--device-map /no/such/map.json: no such file"),
    (["--device-map", "auto", "--device", "cpu"], "device='cpu' and device_map are exclusive"),
    (["--device-map", '{"model.layers.0": "cuda:0", "lm_head": "cpu"}'], "'lm_head' on the CPU next to GPUs"),
])
def test_a_bad_device_map_is_one_line_before_loading(argv, phrase, capsys, monkeypatch):
    assert phrase in cli_error_before_loading(["quantize", "--method", "gptq", "--quiet", *argv], capsys, monkeypatch)


@pytest.mark.skipif(CUDA, reason="checks the messages of a machine without a GPU")
@pytest.mark.parametrize("device_map", ['{"": "cuda:3"}', '{"model.layers.0": "cuda"}'])
def test_a_gpu_this_machine_lacks_is_named(device_map, capsys, monkeypatch):
    argv = ["quantize", "--method", "gptq", "--quiet", "--device-map", device_map]
    assert "but this machine has no CUDA GPU visible to torch" in cli_error_before_loading(argv, capsys, monkeypatch)


def test_a_gpu_index_beyond_the_machine_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'model.layers.1' on cuda:3, but this machine has 2 CUDA GPUs "
                                         r"\(cuda:0 to cuda:1\)"):
        placement.resolve_device_map({"model.layers.0": 0, "model.layers.1": "cuda:3"})
    assert placement.resolve_device_map({"a": 1, "b": "cuda"}) == {"a": "cuda:1", "b": "cuda:0"}
    assert placement.map_devices({"a": "cuda:1", "b": "cuda:0"}) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert placement.map_devices("auto") == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_device_map_forms():
    assert placement.check_device_map("balanced") == "balanced"
    assert placement.check_device_map("cuda:1") == {"": "cuda:1"}  # a lone device: the whole model there
    assert placement.check_device_map({"model": 1, "lm_head": torch.device("cuda", 0)}) == \
        {"model": "cuda:1", "lm_head": "cuda:0"}
    for bad in ({}, ["cpu"], {"model": "meta"}, {"model": -1}, {"model": True}, {3: "cpu"}):
        with pytest.raises(ValueError, match="device_map"):
            placement.check_device_map(bad)
    assert QuantConfig(device_map={"": 0}).device_map == {"": "cuda:0"}  # the config keeps one form


@pytest.mark.parametrize("device_map, phrase", [
    ({m: "cpu" for m in MODULES if m != "model.layers.1"}, r"no device to 9 of the model's tensors, e\.g\. "
                                                          r"model\.layers\.1\..*add its module"),
    ({m: "cpu" for m in MODULES if m != "lm_head"}, r"e\.g\. lm_head\.weight; add its module \('lm_head'\)"),
    ({**CPU_MAP, "model.layer.0": "cpu"}, "names 'model.layer.0', which holds no weight of this model"),
])
def test_a_map_that_does_not_fit_the_model_fails_before_any_weight_is_read(folder, device_map, phrase, monkeypatch,
                                                                            capsys):
    from transformers import AutoModelForCausalLM

    def no_weights(*_a, **_k):
        raise AssertionError("no weight may be read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=phrase):
        load_model(str(folder), device_map=device_map)
    rc = cli.main(["quantize", "--model", str(folder), "--method", "gptq", "--quiet", "--device-map",
                   json.dumps(device_map)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "tacq-lite: error: device_map" in err


def test_a_rotary_table_may_be_mapped_but_need_not_be(folder):
    model, _ = load_model(str(folder), device_map={**CPU_MAP, "model.rotary_emb": "cpu"})  # as "auto" maps write it
    assert placement.module_device(model) == torch.device("cpu")


def test_eval_of_a_saved_model_refuses_a_device_map(tmp_path, capsys):
    rc = cli.main(["eval", "--load", str(tmp_path / "q"), "--device-map", "auto", "--prompt", "x", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device-map places a float model" in err and err.count("\n") == 1


def test_offloaded_weights_are_refused_after_loading():
    model = tiny_llama()
    model.hf_device_map = {"model.embed_tokens": "cuda:0", "model.layers": "cuda:1", "model.norm": "cpu",
                           "lm_head": "cuda:0"}
    with pytest.raises(ValueError, match="offloaded model.norm to the CPU or disk"):
        placement.check_mapped(model)
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(128, 64, device="meta"))
    with pytest.raises(ValueError, match="offloaded model.layers.1.mlp.up_proj.weight"):
        placement.check_mapped(model)


# ---------------------------------------------------------------- a split model is never moved

def test_a_model_spread_over_devices_is_computed_where_it_is_never_moved():
    model = tiny_llama()
    model.hf_device_map = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "cuda:1",
                           "model.norm": "cuda:1", "lm_head": "cuda:0"}  # what transformers sets after dispatching
    assert placement.is_split(model) and placement.compute_device(model, "cpu") is None
    config = QuantConfig(method="gptq", bits=3, n_calib=4, seq_len=32, mse=False)
    with pytest.raises(ValueError, match="spread over cpu by a device_map; .* pass device=None"):
        passes.gptq_quantize(model, WINDOWS, config, device=torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="cannot be moved to one device"):
        with placement.placed(model, torch.device("cpu")):
            pass
    with placement.placed(model, None, torch.bfloat16):  # the dtype may change, where each tensor is
        assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32


def test_a_decoder_layer_split_over_devices_is_named():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.empty(64, 128, device="meta"))
    config = QuantConfig(method="gptq", bits=3, n_calib=4, seq_len=32, mse=False)
    with pytest.raises(ValueError, match=r"decoder layer 1 has weights on cpu, meta; .*map model\.layers\.1 whole"):
        passes.gptq_quantize(model, WINDOWS, config, progress=False)


def test_moving_activations_keeps_their_structure():
    from collections import namedtuple

    Pair = namedtuple("Pair", "cos sin")
    kw = {"position_embeddings": Pair(torch.ones(2), torch.zeros(2)), "mask": None, "ids": [torch.arange(3)], "n": 4}
    moved = placement.to_device(kw, torch.device("cpu"))
    assert isinstance(moved["position_embeddings"], Pair) and moved["mask"] is None and moved["n"] == 4
    assert moved["position_embeddings"].cos is kw["position_embeddings"].cos  # already there: not copied


# ---------------------------------------------------------------- on GPUs (skipped without them)

def agreement(a: dict, b: dict) -> float:
    return sum(int((a[k].cpu() == b[k].cpu()).sum()) for k in a) / sum(a[k].numel() for k in a)


def close_G(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[n].cpu(), b[n].cpu(), rtol=1e-3, atol=1e-5 * a[n].abs().max().item()) for n in a)


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_two_gpus_split_gives_the_one_gpu_result(folder, tmp_path):
    plain, _ = load_model(str(folder))
    plain.to("cuda:0")
    split, _ = load_model(str(folder), device_map=TWO_GPU_MAP)
    assert placement.is_split(split) and placement.hf_device_map(split) == TWO_GPU_MAP
    ga, gb = accumulate_gradients(plain, WINDOWS, progress=False).G, accumulate_gradients(split, WINDOWS,
                                                                                          progress=False).G
    assert close_G(ga, gb)
    linears = walk.named_linears(split)
    assert all(gb[n].device == linears[n].weight.device for n in gb)  # each accumulator beside its weight
    assert gb["model.layers.1.mlp.down_proj"].device == torch.device("cuda", 1)
    one = tacq_quantize(plain, WINDOWS, TACQ.replace(device="cuda:0", cache_dir=str(tmp_path / "a")), progress=False)
    two = tacq_quantize(split, WINDOWS, TACQ.replace(device_map=TWO_GPU_MAP, cache_dir=str(tmp_path / "b")),
                        progress=False)
    assert agreement(weights(plain), weights(split)) > 0.9 and sum(two.n_kept.values()) == sum(one.n_kept.values())
    assert split.model.layers[1].mlp.up_proj.weight.device == torch.device("cuda", 1)  # nothing moved
    assert all(two.masks[n].device == linears[n].weight.device for n in two.masks)


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_two_gpus_run_quantize_evaluates_saves_and_records(folder, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join("the of and a to in is".split() * 120))
    config = TACQ.replace(model=str(folder), n_calib=2, device_map=TWO_GPU_MAP, evals=(str(text),), eval_tokens=256,
                          cache_dir=str(tmp_path / "cache"))
    record = experiment.run_quantize(config, save=str(tmp_path / "q"), progress=False, log=lambda *_: None)
    assert record["hf_device_map"] == TWO_GPU_MAP and record["metrics"][str(text)]["kl"] > 0
    assert [d["device"] for d in record["environment"]["devices"]] == ["cuda:0", "cuda:1"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_one_gpu_and_the_cpu_split_by_accelerate_give_the_cpu_result(folder):
    """accelerate's hooks with layer 1 on the GPU and the rest on the CPU (main device: the CPU, so
    nothing is offloaded): activations and gradients cross devices as on two GPUs."""
    split_map = {**CPU_MAP, "model.layers.1": "cuda:0", "model.norm": "cuda:0"}
    plain, _ = load_model(str(folder))
    split = mapped_with_hooks(folder, split_map)
    assert placement.is_split(split)
    ga, gb = accumulate_gradients(plain, WINDOWS, progress=False).G, accumulate_gradients(split, WINDOWS,
                                                                                          progress=False).G
    assert close_G(ga, gb) and gb["model.layers.1.mlp.up_proj"].device.type == "cuda"
    assert gb["model.layers.0.mlp.up_proj"].device.type == "cpu"
    tacq_quantize(plain, WINDOWS, TACQ.replace(device="cpu"), progress=False, cache=False)
    result = tacq_quantize(split, WINDOWS, TACQ, progress=False, cache=False)
    assert agreement(weights(plain), weights(split)) > 0.9 and sum(result.n_kept.values()) > 0
    assert split.model.layers[1].mlp.up_proj.weight.device.type == "cuda"
