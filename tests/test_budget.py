"""The byte budget (run/budget.py): exact arithmetic on a tiny shape, parameter counts against real
models, the effect of each knob, the fit check and its advice, the CLI, and agreement with the
H100 measurements of bench/results/importance_memory."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tacq_lite.model import walk
from tacq_lite.model.loading import tiny_llama
from tacq_lite.run import budget as bm

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
P, C = bm.PROCESS_BYTES, bm.CUDA_CONTEXT_BYTES
# tiny_llama(): hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads (head_dim 16), vocab 256, tied
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True}


def llama(cfg: dict, device="cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied table once


def test_tiny_shape_by_hand():
    s = bm.model_shape(TINY)
    # q 64×64, k 32×64, v 32×64, o 64×64, gate 128×64, up 128×64, down 64×128
    assert s.linears()["self_attn.k_proj"] == (32, 64) and s.linears()["mlp.down_proj"] == (64, 128)
    assert s.targeted_per_layer == 4096 + 2048 + 2048 + 4096 + 3 * 8192 == 36864
    assert s.targeted == 73728 and s.largest == 8192
    assert s.layer_params == 36864 + 2 * 64  # + two RMSNorms
    assert s.n_params == 2 * 36992 + 256 * 64 + 64 == 90432


def test_targeted_and_layout_match_the_real_model():
    model = tiny_llama()
    s = bm.model_shape(model.config)
    assert s == bm.model_shape(TINY)
    linears = walk.named_linears(model)
    assert sum(lin.weight.numel() for lin in linears.values()) == s.targeted
    assert tuple(s.linears()) == walk.LINEAR_NAMES == bm.LINEAR_NAMES
    for name, (rows, cols) in s.linears().items():
        assert tuple(linears[f"model.layers.1.{name}"].weight.shape) == (rows, cols)
    assert n_params(model) == s.n_params


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_param_count_matches_a_real_llama(tied, bias):
    cfg = {**TINY, "tie_word_embeddings": tied, "attention_bias": bias, "mlp_bias": bias}
    assert n_params(llama(cfg)) == bm.model_shape(cfg).n_params


def test_param_count_matches_meta_models_of_the_public_shapes_and_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for name in ("llama-3.2-1b", "llama-3-8b", "smollm2-135m"):  # meta: shapes only, nothing allocated
        assert n_params(llama(bm.SHAPES[name], device="meta")) == bm.model_shape(name).n_params, name
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)  # q/k/v carry a bias, o does not
    assert n_params(model) == bm.model_shape(cfg).n_params
    assert bm.model_shape("llama-3-8b").n_params == 8_030_261_248  # Meta's published 8.03B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [True, False])
def test_measured_parameter_bytes_equal_predicted_weight_bytes(dtype, tied):
    model = llama({**TINY, "tie_word_embeddings": tied}, dtype=dtype)
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    b = bm.budget(model.config, dtype=str(dtype).removeprefix("torch."))
    assert b.host_parts["load"]["weights"] == measured


def test_tiny_budget_by_hand():
    b = bm.budget(TINY, dtype="float32", device="cuda", n_calib=4, seq_len=8, n_eval=2, head_chunk=None)
    w = 90432 * 4  # 361728
    # The gradient pass moves the model to the device (nothing stays behind); scoring and the masked
    # pass keep G, Q(W) − W and the masks on the device.
    assert b.host == {"load": P + w, "gptq_1": P + w, "gradients": P, "scoring": P + w + 8192 * 2,
                      "gptq_2": P + w + 73728}  # scoring: the score cache written one tensor at a time
    layer = 36992 * 4  # one decoder layer's weights: 147968
    gptq = 4 * (3 * 64 * 128 + 4 * 128 * 128)  # down_proj [64, 128]: 3 weight copies + 4 Hessian-sized: 360448
    calib = 4 * 8 * (3 * 64 + 128) * 4  # 40960
    act = 2 * 8 * ((12 - 4) * 64 * 4 + 4 * 64 * 4 + 4 * 128 * 4)  # 2 layers × 8 tokens: 81920
    backward = max(7 * 256 * 4 * 3, 2 * 8192 * 4)  # logits 21504 < one linear's grad and |grad| 65536
    assert b.device == {"load": C, "gptq_1": C + layer + gptq + calib,
                        "gradients": C + w + 73728 * 4 + act + backward,
                        "scoring": C + 73728 * (2 + 2 + 1) + 4 * 8192 * 4,
                        "gptq_2": C + layer + gptq + calib}
    assert b.peak_device == C + 804096 and b.peak_host == P + w + 73728
    assert b.disk == 2 * 7 * 256 * 4 + 73728 * 2  # KL reference + Q(W) − W between the first pass and scoring


def test_bfloat16_halves_the_weights():
    f32, bf16 = (bm.budget("llama-3-8b", dtype=d, device="cuda") for d in ("float32", "bfloat16"))
    assert 2 * bf16.host_parts["load"]["weights"] == f32.host_parts["load"]["weights"]
    assert 2 * bf16.device_parts["gptq_1"]["layer weights"] == f32.device_parts["gptq_1"]["layer weights"]
    assert 2 * bf16.device_parts["gptq_1"]["calibration activations"] == \
        f32.device_parts["gptq_1"]["calibration activations"]
    g16 = bm.budget("llama-3-8b", dtype="bfloat16", device="cuda", grad_dtype="bfloat16")
    assert 2 * g16.device_parts["gradients"]["model (grad dtype)"] == f32.device_parts["gradients"]["model (grad dtype)"]


def test_accumulators_on_cpu_move_their_bytes_to_the_host():
    s = bm.model_shape("llama-3-8b")
    same = bm.budget(s, dtype="bfloat16", device="cuda")
    cpu = bm.budget(s, dtype="bfloat16", device="cuda", accum_device="cpu")
    accum = s.targeted * 4
    assert same.device["gradients"] - cpu.device["gradients"] == accum
    assert cpu.host["gradients"] - same.host["gradients"] == accum + s.largest * 4  # + a one-linear staging copy
    sq = bm.budget(s, dtype="bfloat16", device="cuda", squares=True)
    assert sq.device_parts["gradients"]["accumulators"] == 2 * accum
    assert bm.budget(s, device="cuda", accum_device="cuda").settings["accum_device"] is None  # same place


def test_checkpointing_reduces_activations():
    plain = bm.budget("llama-3-8b", device="cuda")
    ckpt = bm.budget("llama-3-8b", device="cuda", checkpointing=True)
    a, b = plain.device_parts["gradients"], ckpt.device_parts["gradients"]
    assert b["activations"] == 32 * 2048 * 4096 * 4  # the layers' inputs only
    assert b["activations"] * 10 < a["activations"]
    assert ckpt.peak_device < plain.peak_device


def test_cpu_runs_put_everything_on_the_host():
    gpu, cpu = (bm.budget(TINY, device=d, n_calib=4, seq_len=8) for d in ("cuda", "cpu"))
    assert cpu.peak_device == 0 and all(not p for p in cpu.device_parts.values())
    # on the cpu the onloaded layer is the host copy itself, and float32 gradients share the model
    assert cpu.host["gptq_1"] == gpu.host["gptq_1"] + gpu.device["gptq_1"] - C - 36992 * 4
    assert cpu.host["gradients"] == gpu.host["gradients"] + gpu.device["gradients"] - C  # the model counted once
    assert cpu.host["scoring"] == gpu.host["scoring"] + gpu.device["scoring"] - C
    assert "model (grad dtype)" in bm.budget(TINY, dtype="bfloat16", device="cpu").host_parts["gradients"]


def test_gptq_method_has_two_stages():
    b = bm.budget(TINY, method="gptq", device="cuda")
    assert list(b.host) == ["load", "gptq"] and list(b.device) == ["load", "gptq"]
    assert "Q(W)-W cache" not in b.host_parts["gptq"]


def test_fits_and_check_fits_name_the_stage_and_the_change():
    b = bm.budget("llama-3-8b", dtype="bfloat16", device="cuda")
    assert b.fits(1000 * GIB, 1000 * GIB)[0] and b.fits()[0]
    ok, why = b.fits(1000 * GIB, 80 * GIB)
    assert not ok and "stage 'gradients'" in why and "--accum-device cpu" in why and "\n" not in why
    with pytest.raises(ValueError, match=r"stage 'gradients'.*--accum-device cpu.*--checkpointing"):
        bm.check_fits(b, host_bytes=1000 * GIB, device_bytes=40 * GIB)
    g = bm.budget("llama-3-8b", dtype="bfloat16", device="cpu", method="gptq")
    with pytest.raises(ValueError, match=r"stage 'gptq' needs 32\.3 GiB of host.*--n-calib 32 \(fewer"):
        bm.check_fits(g, host_bytes=24 * GIB)
    with pytest.raises(ValueError, match=r"stage 'load'.*no setting here fits"):
        bm.check_fits(g, host_bytes=10 * GIB)
    f32 = bm.budget("llama-3-8b", dtype="float32", device="cpu", method="gptq")  # load 30.5, gptq 60.2 GiB
    with pytest.raises(ValueError, match=r"stage 'gptq'.*: use --dtype bfloat16$"):
        bm.check_fits(f32, host_bytes=40 * GIB)
    with pytest.raises(ValueError, match=r"stage 'load'.*: use --dtype bfloat16 and --n-calib 4 \(fewer"):
        bm.check_fits(f32, host_bytes=20 * GIB)
    bm.check_fits(bm.budget(TINY, device="cpu", n_calib=4, seq_len=8))  # this machine: MemAvailable
    assert bm.available_host_bytes() > 0


def test_model_shape_inputs_and_errors(tmp_path):
    assert bm.model_shape({**TINY, "head_dim": 32}).linears()["self_attn.q_proj"] == (128, 64)
    assert bm.model_shape("llama-3-70b").kv_heads == 8 and not bm.model_shape("llama-3-70b").tied
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert bm.model_shape(tmp_path) == bm.model_shape(tmp_path / "config.json") == bm.model_shape(TINY)
    with pytest.raises(ValueError, match="unknown shape 'nope'"):
        bm.model_shape("nope")
    with pytest.raises(ValueError, match="intermediate_size"):
        bm.model_shape({k: v for k, v in TINY.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="do not divide"):
        bm.model_shape({**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="dtype 'int8'"):
        bm.budget(TINY, dtype="int8")
    with pytest.raises(ValueError, match="accum_device"):
        bm.budget(TINY, device="cpu", accum_device="cuda")
    with pytest.raises(ValueError, match="n_calib 0"):
        bm.budget(TINY, n_calib=0)


def test_cli_prints_a_table_and_fails_in_one_line(capsys):
    assert bm.main(["--shape", "llama-3-8b", "--dtype", "bfloat16", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "| gradients |" in out and "| stage | host GiB | cuda GiB |" in out and "peak cuda 82.85 GiB" in out
    assert bm.main(["--shape", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown shape 'nope'" in err
    assert bm.main(["--shape", "llama-3-8b", "--device", "cuda", "--device-gib", "40"]) == 2
    assert "stage 'gradients'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bm.main(["--dtype", "int8"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "tacq_lite.run.budget", "--shape", "nope"], check=False, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_format_table():
    rows = [bm.budget(n, dtype="bfloat16", device="cuda") for n in ("smollm2-135m", "llama-3-8b")]
    table = bm.format_table(rows + [("8b, accum cpu", bm.budget("llama-3-8b", device="cuda", accum_device="cpu"))])
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count("|") == 11 for line in lines)
    assert "| llama-3-8b | bfloat16 | cuda |" in table and "82.85 (gradients)" in table and "| 8b, accum cpu |" in table


@pytest.mark.parametrize("record, kw", [
    ("llama3-8b_L32_cuda_T512_acc-float32-same.json", {"seq_len": 512}),
    ("llama3-8b_L32_cuda_T2048_acc-float32-same_ckpt.json", {"seq_len": 2048, "checkpointing": True}),
    ("llama3-8b_L32_cuda_T512_acc-float32-cpu_ckpt.json", {"seq_len": 512, "checkpointing": True,
                                                           "accum_device": "cpu"}),
])
def test_gradient_stage_agrees_with_the_h100_measurements(record, kw):
    """torch.cuda.max_memory_allocated of bench/bench_importance_memory.py (fp32 Llama-3-8B on an H100)
    against the predicted gradient stage, less the CUDA context (outside torch's allocator)."""
    path = ROOT / "bench" / "results" / "importance_memory" / record
    if not path.is_file():
        pytest.skip(f"{record} is not in bench/results")
    rec = json.loads(path.read_text())
    b = bm.budget("llama-3-8b", dtype="float32", device="cuda", head_chunk=None, **kw)  # measured before chunking
    predicted = b.device["gradients"] - C
    assert abs(predicted - rec["peak_bytes"]) < 0.02 * rec["peak_bytes"], (predicted / GIB, rec["peak_gib"])
