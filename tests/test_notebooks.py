"""Every notebook runs under papermill with small CPU parameters and records its results.

nbval (`pytest --nbval-lax notebooks`) re-executes the committed notebooks with their own
defaults; this file checks the papermill side: parameters are honoured, the run finishes,
and the JSON it writes holds sane values.
"""
import json
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run(name, tmp_path, **params):
    out = tmp_path / "results.json"
    papermill.execute_notebook(
        str(NOTEBOOKS / name), str(tmp_path / name), parameters={**params, "results_path": str(out)},
        cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
    )
    return json.loads(out.read_text())


@pytest.mark.slow
def test_00_setup(tmp_path):
    r = run("00_setup.ipynb", tmp_path, eval_tokens=512, seq_len=256)
    assert 5 < r["fp_ppl"] < 100 and r["n_tokens"] == 2 * 255
    assert "Paris" in r["reply"] and r["n_linears"] == 210


@pytest.mark.slow
def test_01_uniform_quantization(tmp_path):
    r = run("01_uniform_quantization.ipynb", tmp_path, ppl_bits=[8, 3], groupsizes=[-1], eval_tokens=512, seq_len=256)
    assert set(r["rtn_ppl"]) == {"8bit_g-1", "3bit_g-1"}  # the parameters were honoured
    assert abs(r["rtn_ppl"]["8bit_g-1"] / r["fp_ppl"] - 1) < 0.02
    assert r["rtn_ppl"]["3bit_g-1"] > 2 * r["fp_ppl"]


@pytest.mark.slow
def test_02_gptq(tmp_path):
    r = run("02_gptq.ipynb", tmp_path, bits_list=[3], eval_tokens=1024)
    assert set(r["gptq_ppl"]) == {"3"}
    assert r["gptq_ppl"]["3"] < r["rtn_ppl"]["3"]
    assert r["gptq_wins"] >= 0.95 * r["n_linears"]


@pytest.mark.slow
def test_03_contrastive_importance(tmp_path):
    r = run("03_contrastive_importance.ipynb", tmp_path, n_calib=2, seq_len=64)
    assert r["taylor_corr"] > 0.9
    J = r["jaccard"]
    assert J["tacq"]["tacq"] == 1.0 and J["tacq"]["random"] < 0.05
    assert r["n_kept"] == round(0.0035 * 106_168_320)  # the global top-k keeps exactly k weights


@pytest.mark.slow
def test_04_outlier_masking(tmp_path):
    r = run("04_outlier_masking.ipynb", tmp_path, settings=[[3, -1]], ratios=[0.0035],
            selectors=["tacq", "magnitude", "random"], n_calib=2, seq_len=64, eval_tokens=512)
    p = r["ppl"]
    assert p["3bit_g-1_tacq_0.0035"] < p["3bit_g-1_none_0.0"]
    assert p["3bit_g-1_tacq_0.0035"] < p["3bit_g-1_random_0.0035"]
    assert 3.1 < r["avg_bits"]["3bit_g-1_0.0035"] < 3.2  # ~3.1 bits, as the paper says


@pytest.mark.slow
def test_05_triton_dequant_kernels(tmp_path):
    r = run("05_triton_dequant_kernels.ipynb", tmp_path, bits=2, rows=20, cols=90, model_bits=4, model_groupsize=64)
    assert r["bits"] == 2 and r["kernel_matches"] and r["gemv_err"] < 1e-4
    assert r["loaded_equal"] and "Paris" in r["generation"]
    # 4-bit codes fill their words: on disk = accounting + the CSR row offsets only (~0.05 bits)
    assert 0 < r["disk_bits"] - r["accounting_bits"] < 0.06
