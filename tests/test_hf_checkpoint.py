"""A saved tacq_lite model loads with transformers' AutoModelForCausalLM (model/hf_quantizer.py)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import tacq_lite  # noqa: F401  registers quant_method "tacq_lite" with transformers
from tacq_lite import QuantConfig, tiny_llama
from tacq_lite.io import sha256_file
from tacq_lite.model.checkpoint import (
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    TENSOR_FILE,
    load_quantized,
    parse_size,
    save_quantized,
    upgrade_checkpoint,
)
from tacq_lite.model.qlinear import QuantLinear, convert_model, quant_linears
from tacq_lite.run.experiment import quantize_model


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny Llama quantized with TaCQ (3 bits, 2 % kept) and packed into QuantLinears."""
    model = tiny_llama()
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(method="tacq", bits=3, ratio=0.02, n_calib=4, seq_len=32, mse=False,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))
    result = quantize_model(model, windows, cfg, progress=False)
    return convert_model(copy.deepcopy(model), result.grids, bits=3, masks=result.masks)


@pytest.fixture(scope="module")
def saved(packed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "m"
    save_quantized(packed, folder)
    return folder


X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _rewrite_manifest(folder, edit):
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    for name in meta["files"]:
        meta["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    (folder / META_FILE).write_text(json.dumps(meta))


def test_from_pretrained_equals_load_quantized(saved):
    ours, _, meta = load_quantized(saved)
    theirs = AutoModelForCausalLM.from_pretrained(saved)
    layers = quant_linears(theirs)
    assert set(layers) == set(meta["layers"]) and len(layers) == 14
    assert all(isinstance(q, QuantLinear) and q.nnz == meta["layers"][n]["nnz"] for n, q in layers.items())
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight  # tied, as saved
    assert torch.equal(ours(X).logits, theirs(X).logits)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_from_pretrained_with_a_device_map(saved, device_map):
    theirs = AutoModelForCausalLM.from_pretrained(saved, device_map=device_map)
    assert torch.equal(load_quantized(saved)[0](X).logits, theirs(X).logits)


def test_from_pretrained_in_bfloat16(saved):
    """dtype= casts the unquantized tensors and the computation; the packed buffers keep their dtypes."""
    theirs = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    ours = load_quantized(saved, dtype=torch.bfloat16)[0]
    q = theirs.model.layers[0].mlp.down_proj
    assert theirs.dtype == torch.bfloat16 and q.scale.dtype == torch.float16 and q.qweight.dtype == torch.int32
    assert torch.equal(ours(X).logits, theirs(X).logits)


def test_config_json_describes_the_layout(saved, packed):
    q = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "tacq_lite" and q["format_version"] == FORMAT_VERSION
    assert q["bits"] == 3 and q["group_size"] == -1 and q["unquantized_dtype"] == "bfloat16"
    assert {n: s["nnz"] for n, s in q["layers"].items()} == {n: m.nnz for n, m in quant_linears(packed).items()}


def test_unquantized_tensors_are_stored_in_16_bit(saved, packed):
    with safe_open(str(saved / TENSOR_FILE), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        qweight = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        inv_freq = f.get_tensor("model.rotary_emb.inv_freq")  # a computed buffer: kept exact
    assert embed.dtype == torch.bfloat16 and qweight.dtype == torch.int32 and inv_freq.dtype == torch.float32
    assert torch.equal(embed, packed.model.embed_tokens.weight.to(torch.bfloat16))
    # The loaded model computes in the dtype it was saved from, with the 16-bit values.
    loaded = load_quantized(saved)[0]
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(loaded.model.embed_tokens.weight, embed.float())


def test_float32_storage_is_exact(packed, tmp_path):
    save_quantized(packed, tmp_path / "m", unquantized_dtype="float32")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(X).logits, packed(X).logits)


def test_sharded_save_writes_an_index(saved, packed, tmp_path):
    meta = save_quantized(packed, tmp_path / "s", max_shard_size="20KB")
    shards = meta["shards"]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "s" / TENSOR_FILE).exists()
    index = json.loads((tmp_path / "s" / INDEX_FILE).read_text())
    stored = {}
    for shard in shards:
        with safe_open(str(tmp_path / "s" / shard), "pt") as f:
            names = list(f.keys())
            data = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
        assert data <= 20_000 or len(names) == 1  # a tensor bigger than the limit gets a file of its own
        stored.update({k: shard for k in names})
    assert index["weight_map"] == stored
    reference = load_quantized(saved)[0](X).logits
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "s")(X).logits, reference)
    assert torch.equal(load_quantized(tmp_path / "s")[0](X).logits, reference)


def test_loading_without_tacq_lite_fails_loudly(saved):
    """Plain transformers must not hand back a model with random linears."""
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(saved)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode != 0
    assert "tacq_lite" in out.stderr + out.stdout  # "Unknown quantization type, got tacq_lite"
    assert "mismatch" in out.stderr


def test_checksums_are_verified(packed, tmp_path):
    folder = tmp_path / "m"
    save_quantized(packed, folder)
    data = bytearray((folder / TENSOR_FILE).read_bytes())
    data[-10] ^= 0xFF
    (folder / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_and_manifest_must_agree(packed, tmp_path):
    folder = tmp_path / "m"
    save_quantized(packed, folder)
    config = json.loads((folder / "config.json").read_text())
    name = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][name]["nnz"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="replaced"):  # an edited config.json fails its size check first
        AutoModelForCausalLM.from_pretrained(folder)
    _rewrite_manifest(folder, lambda meta: None)  # checksums that match the edit
    with pytest.raises(ValueError, match="different layers"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_layout_that_does_not_fit_the_tensors_is_refused(packed, tmp_path):
    folder = tmp_path / "m"
    save_quantized(packed, folder)
    config = json.loads((folder / "config.json").read_text())
    name = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][name]["bits"] = 2  # 2-bit codes pack 16 to a word, not 10
    (folder / "config.json").write_text(json.dumps(config))

    def edit(meta):
        meta["layers"][name]["bits"] = 2

    _rewrite_manifest(folder, edit)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="disagree"):
        load_quantized(folder)


def test_save_pretrained_points_to_save_quantized(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(Exception, match="tacq_lite|serializ"):
        model.save_pretrained(tmp_path / "again")


def _as_version_1(packed, folder):
    """The folder a tacq_lite of format version 1 wrote: fp32 tensors in one file, no markers,
    no quantization_config."""
    from safetensors.torch import save_file

    from tacq_lite.model.checkpoint import _model_tensors

    save_quantized(packed, folder, unquantized_dtype="float32")
    tensors, _ = _model_tensors(packed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSOR_FILE), metadata={"format": "x"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))

    def edit(meta):
        meta["format_version"] = 1
        del meta["shards"], meta["unquantized_dtype"]

    _rewrite_manifest(folder, edit)


def test_version_1_folders_load_and_upgrade(packed, tmp_path):
    old = tmp_path / "v1"
    _as_version_1(packed, old)
    model, _, meta = load_quantized(old)
    assert meta["format_version"] == 1 and torch.equal(model(X).logits, packed(X).logits)
    new_meta = upgrade_checkpoint(old, tmp_path / "v2")
    assert new_meta["format_version"] == FORMAT_VERSION and (old / META_FILE).is_file()  # the old folder stays
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "v2")(X).logits,
                       load_quantized(tmp_path / "v2")[0](X).logits)


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("2 kb", 2000),
                                            (1024, 1024)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["0", "-3MB", "lots", 0])
def test_parse_size_refuses_nonsense(bad):
    with pytest.raises(ValueError, match="e.g. 5GB"):
        parse_size(bad)


def test_bad_unquantized_dtype_is_refused(packed, tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        save_quantized(packed, tmp_path / "m", unquantized_dtype="int8")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_embedded_model_round_trip_through_transformers(tmp_path):
    """The embedded SmolLM2-135M, RTN 3-bit: from_pretrained gives load_quantized's logits, and the
    16-bit embedding keeps the folder near the size the bits accounting predicts."""
    from tacq_lite import load_model

    model, tok = load_model()
    windows = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, windows, QuantConfig(method="rtn", bits=3, mse=False), progress=False)
    convert_model(model, result.grids, bits=3, codes=result.codes or None)
    meta = save_quantized(model, tmp_path / "m", tokenizer=tok)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = load_quantized(tmp_path / "m")[0]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    size = meta["files"][TENSOR_FILE]["bytes"]
    assert size == pytest.approx(meta["bytes"]["quantized_linears"] + meta["bytes"]["other_tensors"], rel=0.01)
    assert size < 110 * 2**20  # the fp32 embedding alone was 108 MiB


def test_cli_saves_shards_that_transformers_loads(tmp_path, capsys):
    """`tacq-lite quantize --save DIR --max-shard-size 20KB` on a tiny model folder: shards with an
    index, loaded by from_pretrained; a size that is not one fails before the run."""
    from test_failure_modes import save_tiny_model

    from tacq_lite import cli

    folder = save_tiny_model(tmp_path / "model")
    out = tmp_path / "q"
    args = ["quantize", "--model", str(folder), "--method", "rtn", "--bits", "4", "--no-mse", "--save", str(out)]
    assert cli.main(args + ["--max-shard-size", "lots"]) == 2
    assert "e.g. 5GB" in capsys.readouterr().err and not out.exists()
    assert cli.main(args + ["--max-shard-size", "20KB"]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert len(meta["shards"]) > 1 and (out / INDEX_FILE).is_file()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(X).logits, load_quantized(out)[0](X).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_from_pretrained_onto_a_gpu(saved):
    """device_map="cuda": the packed buffers land on the GPU and QuantLinear runs its Triton kernels
    there; logits close to the CPU's (the kernels sum in another order)."""
    theirs = AutoModelForCausalLM.from_pretrained(saved, device_map="cuda")
    q = theirs.model.layers[0].self_attn.q_proj
    assert q.qweight.is_cuda and q.kept_values.is_cuda
    torch.testing.assert_close(theirs(X.cuda()).logits.cpu(), load_quantized(saved)[0](X).logits,
                               rtol=1e-3, atol=1e-3)


def test_a_packed_buffer_missing_from_the_files_is_refused(packed, tmp_path):
    """transformers fills missing tensors with uninitialised memory; the layout check stops that first."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    save_quantized(packed, folder)
    tensors = load_file(str(folder / TENSOR_FILE))
    del tensors["model.layers.1.mlp.up_proj.qweight"]
    save_file(tensors, str(folder / TENSOR_FILE), metadata={"format": "pt"})
    _rewrite_manifest(folder, lambda meta: None)
    with pytest.raises(ValueError, match="lacks model.layers.1.mlp.up_proj.qweight"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_linears_with_biases(tmp_path):
    """Biases of packed layers are stored in 16-bit like every unquantized tensor and load back in
    the compute dtype, by both loaders alike."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         attention_bias=True, mlp_bias=True)).eval()
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, windows, QuantConfig(method="rtn", bits=4, mse=False), progress=False)
    convert_model(model, result.grids, bits=4, codes=result.codes or None)
    meta = save_quantized(model, tmp_path / "m")
    assert meta["layers"]["model.layers.0.mlp.up_proj"]["bias"]
    with safe_open(str(tmp_path / "m" / TENSOR_FILE), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.bias").dtype == torch.bfloat16
    ours = load_quantized(tmp_path / "m")[0]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert ours.model.layers[0].mlp.up_proj.bias.dtype == torch.float32
    assert torch.equal(ours(X).logits, theirs(X).logits)


def test_a_saved_folder_is_not_a_model_to_quantize(packed, tmp_path):
    """--model on a tacq_lite folder (of any format version) points to eval --load instead of loading
    it as a float model."""
    from tacq_lite.model.loading import load_model

    _as_version_1(packed, tmp_path / "v1")
    with pytest.raises(ValueError, match="tacq-lite eval --load"):
        load_model(str(tmp_path / "v1"))
