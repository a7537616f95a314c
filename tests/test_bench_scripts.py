"""The benchmark scripts run (on tiny shapes): a GPU session can use them without debugging first."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_importance_memory_bench_on_a_tiny_llama(tmp_path):
    bench = load("bench_importance_memory")
    rec = bench.main(["--shape", "tiny", "--device", "cpu", "--samples", "2", "--seq-len", "16",
                      "--checkpointing", "--out", str(tmp_path)])
    # 2 layers x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128)
    assert rec["targeted_weights"] == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert rec["accumulators_finite_and_nonzero"] and rec["seconds_per_sample"] > 0
    assert rec["predicted_gib"]["accumulators"] == pytest.approx(rec["targeted_weights"] * 4 / 2**30, abs=0.01)
    saved = json.loads((tmp_path / "tiny_L2_cpu_T16_acc-float32-same_ckpt.json").read_text())
    assert saved["samples"] == 2 and saved["checkpointing"] is True
    assert not list(tmp_path.glob("*.tmp"))


def test_importance_memory_bench_refuses_a_missing_gpu(monkeypatch):
    bench = load("bench_importance_memory")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--shape", "tiny", "--device", "cuda"])


def test_importance_memory_prediction_for_llama3_8b(tmp_path):
    """On the meta device nothing is allocated; the byte budget of the real 8B shapes comes back."""
    bench = load("bench_importance_memory")
    rec = bench.main(["--device", "meta", "--accum-device", "cpu", "--out", str(tmp_path)])
    assert rec["targeted_weights"] == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336)
    assert rec["predicted_gib"]["on_device"] == rec["predicted_gib"]["weights"]  # accumulators on the host
    assert 29 < rec["predicted_gib"]["weights"] < 31  # 8.03 B fp32 parameters


def test_gptq_pass_compare_counts_the_weights_that_differ(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    bench = load("bench_gptq_pass")
    a = {"l0": torch.zeros(4, 8), "l1": torch.ones(2, 2)}
    b = {"l0": torch.zeros(4, 8), "l1": torch.tensor([[1.0, 1.5], [1.0, 1.0]])}
    save_file(a, tmp_path / "a.safetensors"), save_file(b, tmp_path / "b.safetensors")
    bench.compare(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    out = capsys.readouterr().out
    assert "1 of 36 weights differ" in out and "largest difference 0.5" in out
    save_file({"l0": torch.zeros(4, 8)}, tmp_path / "c.safetensors")
    with pytest.raises(SystemExit, match="different linears"):
        bench.compare(str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"))


def test_mask_layer_error_on_a_tiny_llama(capsys):
    bench = load("mask_layer_error")
    rows = bench.main(["--tiny", "--n-calib", "2", "--seq-len", "16", "--ratios", "0,0.05"])
    assert len(rows) == 3 * 7  # every linear of the layer: no mask, one random mask stored two ways
    for r in rows:
        assert r["layer_error"] > 0 and r["gptq_loss"] > 0
        assert (r["kept"] > 0) == (r["ratio"] > 0)
    for name in {r["linear"] for r in rows}:  # a kept weight sends no error either way: same GPTQ loss
        comp, orig = ([r for r in rows if r["linear"] == name and r["keep_value"] == kv][0]
                      for kv in ("compensated", "original"))
        assert comp["gptq_loss"] == orig["gptq_loss"] and comp["kept"] == orig["kept"]
    out = capsys.readouterr().out
    assert "| self_attn.q_proj | 5.00% |" in out and "| compensated |" in out and "| original |" in out
    with pytest.raises(SystemExit, match="decoder layers"):
        bench.main(["--tiny", "--layer", "7"])


def test_parallel_bench_on_a_tiny_llama():
    bench = load("bench_parallel")
    from tacq_lite.algo import gptq

    block = gptq.HESSIAN_BLOCK
    rec = bench.main(["hessian", "--tiny", "--rounds", "1", "--seq-len", "32"])
    assert set(rec["ms_per_add_batch"]) == {f"{c} cols, {k}" for c in (64, 96) for k in ("full product", "row blocks")}
    assert all(v > 0 for v in rec["ms_per_add_batch"].values()) and gptq.HESSIAN_BLOCK == block
    rec = bench.main(["threads", "--tiny", "--rounds", "1", "--seq-len", "16", "--n", "2", "--layers", "1",
                      "--samples", "2"])
    runs = rec["runs"]
    assert len(runs["gptq 1 thread x 2"][0]) == 2  # two processes, two timings
    timings = [t for v in runs.values() for t in (v[0] if isinstance(v[0], list) else [v[0]])]
    assert len(timings) == 6 and all(t > 0 for t in timings)


def test_quality_bench_paper_tables_from_records():
    """The issue-18 tables: per-seed rows, the over-seeds summary and the paired ratios, from records."""
    bench = load("bench_quality")
    seeds = (0, 1, 2)
    assert {r["seed"] for r in bench.SUITES["paper-seeds"]} == set(seeds)
    for sel in ("tacq", "msg", "random", "hessian"):  # the ranking rows run at every seed
        assert {r["seed"] for r in bench.SUITES["paper-seeds"] if r.get("selector") == sel} == set(seeds)
    names = [bench.row_name(r) for r in bench.SUITES["paper-selectors"]]
    assert len(names) == len(set(names))

    def record(method, seed, shift, selector="tacq", keep_value="compensated"):  # as config.to_dict() writes
        nll = [3.0 + 0.1 * (i % 7) + shift for i in range(64)]  # 64 windows: hard and easy ones
        cfg = dict(method=method, bits=3, groupsize=-1, seed=seed, selector=selector, ratio=0.0035,
                   keep_value=keep_value)
        m = dict(ppl=2.718 ** (sum(nll) / 64), ppl_low=1.0, ppl_high=100.0, n_tokens=64 * 511, n_windows=64,
                 window_nll=nll)
        return {"config": cfg, "metrics": {"wikitext2": m}, "avg_bits": 3.1, "seconds_total": 1.0}

    recs = [r for s in seeds for r in (record("gptq", s, 0.05), record("tacq", s, 0.0),
                                       record("tacq", s, 0.0001 * (s - 1), "tacq", "original"))]
    summary = bench.summary_table(recs)
    assert "| tacq tacq 0.35% compensated | 3 | -1 | 3 |" in summary and "s2:" in summary
    paired = bench.paired_table(recs)
    # tacq lies 0.05 nats below gptq on every window: exp(-0.05) with no spread; vs original: tiny shifts
    assert "| tacq / gptq | 3 | -1 | 0.35% | 0 | 0.951 [0.951, 0.951] | a lower |" in paired
    assert "| tacq / tacq (original) | 3 | -1 | 0.35% | 1 | 1.000 [1.000, 1.000] | not distinguishable |" in paired
    assert "| tacq / tacq (original) | 3 | -1 | 0.35% | 0 | 1.000 [1.000, 1.000] | b lower |" in paired


def test_quality_bench_task_tables_give_intervals_and_paired_differences():
    """paper-tasks: each metric with its interval over items, and TaCQ − GPTQ on the same items."""
    bench = load("bench_quality")

    def record(method, calib, right_every, nll_shift):
        n = 40
        right = [i % right_every == 0 for i in range(n)]  # accuracy 1 / right_every
        nll = [1.0 + 0.1 * (i % 5) + nll_shift for i in range(n)]
        windows = [3.0 + 0.1 * (i % 7) + nll_shift for i in range(64)]
        m = {"wikitext2": dict(ppl=2.718 ** (sum(windows) / 64), ppl_low=1.0, ppl_high=100.0, n_tokens=64 * 511,
                               n_windows=64, window_nll=windows),
             "mmlu": dict(n=n, item_right=right, item_nll=nll), "gsm8k": dict(n=n, item_nll=nll),
             "synthetic": dict(n=n, item_right=right, item_nll=nll)}
        return {"config": dict(method=method, calib=calib), "metrics": m, "seconds_total": 1.0}

    recs = [record("gptq", "wikitext2", 4, 0.0), record("tacq", "gsm8k", 4, -0.2), record("tacq", "mmlu", 4, 0.0)]
    table = bench.paper_task_table(recs)
    assert "| tacq (gsm8k calibration) |" in table and "0.250 [" in table
    assert "MMLU 40 questions; GSM8K 40 test solutions" in table
    paired = bench.paper_task_paired(recs)
    # gsm8k calibration lies 0.2 nats below on every item: a difference with no spread, marked
    assert "| tacq (gsm8k calibration) | 0.819 [0.819, 0.819] * | +0.000 [+0.000, +0.000] | -0.200 [-0.200, -0.200] *" \
        in paired
    # identical items: no difference, not marked
    assert "| tacq (mmlu calibration) | 1.000 [1.000, 1.000] | +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |" \
        in paired
    # against the mmlu-calibrated row instead: gsm8k calibration is 0.2 nats lower, and GPTQ is left out
    vs = bench.paper_task_paired(recs, against="tacq (mmlu calibration)")
    assert "| configuration − tacq (mmlu calibration) |" in vs and "| gptq |" not in vs
    assert "| tacq (gsm8k calibration) | 0.819 [0.819, 0.819] * | +0.000 [+0.000, +0.000] | -0.200 [-0.200, -0.200] *" in vs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_bench_runs_the_whole_pipeline_on_the_cpu(tmp_path, dtype):
    """bench_gpu.py's stages (first pass + gradients, scoring, masked pass) on a tiny random Llama."""
    bench = load("bench_gpu")
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--dtype", dtype, "--n-calib", "2", "--seq-len", "16",
                     "--ratio", "0.01", "--out", str(tmp_path)])
    assert rc == 0
    rec = json.loads((tmp_path / f"tiny_{dtype}.json").read_text())
    assert set(rec["seconds"]) >= {"load", "qw", "gradients", "score", "masked_gptq"}
    assert rec["n_kept"] == round(0.01 * 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192))
    assert rec["predicted"]["peak_device_gib"] == 0 and rec["peak_host_gib"] > 0
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path)]) == 2


def test_notebook_timing_bench_measures_a_run_and_refuses_a_bad_prefix(tmp_path, capsys):
    nbformat = pytest.importorskip("nbformat")
    bench = load("bench_notebooks")
    with pytest.raises(SystemExit) as stop:
        bench.main(["99"])
    assert stop.value.code == 2 and "no notebook starts with 99" in capsys.readouterr().err
    if not Path(bench.TIME).is_file():
        pytest.skip("GNU time is not installed")
    nb = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = sum(range(10**6))")]), nb)
    (tmp_path / "out").mkdir()
    run = bench.timed_execute(nb, tmp_path / "out", tmp_path, cwd=tmp_path)
    assert run["wall_s"] > 0 and run["cpu_s"] > 0 and 0 < run["peak_rss_gib"] < 8
    assert bench.cpu_model() == "unknown" or "family" in bench.cpu_model()  # tells CPU generations apart
    assert run["steal_s"] is None or 0 <= run["steal_s"] <= run["wall_s"] * os.cpu_count()  # stolen during the run
    assert (tmp_path / "out" / "tiny.ipynb").is_file()  # the executed copy; the original is untouched


def test_notebook_timing_table_marks_edited_notebooks():
    bench = load("bench_notebooks")
    run = {"wall_s": 61.0, "cpu_s": 90.0, "peak_rss_gib": 2.0}
    record = {"notebooks": {"03_x.ipynb": {"cold": run, "warm": {**run, "wall_s": 30.0}, "commit": "abc1234",
                                           "uncommitted_edits": True, "date": "2026-12-07 05:00 UTC"}}}
    row = bench.markdown_table(record).splitlines()[-1]
    assert row == "| `03_x` | 61 s, 90 s | 30 s, 90 s | 2.0 GiB | 2026-12-07 05:00 UTC, abc1234 + edits |"


def test_kernel_bench_writes_one_record_per_measurement(tmp_path, monkeypatch):
    """bench_kernels' GPU path, run under the interpreter on a small shape with a stand-in timer."""
    import triton.testing

    bench = load("bench_kernels")
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(fn()) or 0.02)
    records = bench.bench_gpu(64, tmp_path, (1, 3), (3,), shapes=[(24, 640)], device="cpu")
    assert [(r["M"], r["dtype"]) for r in records] == [(1, "float16"), (1, "bfloat16"), (3, "float16")]
    rec = json.loads((tmp_path / "24x640_b3_g64_m1_float16.json").read_text())
    assert rec["speedup"] == 1.0 and rec["rel_err_vs_float64"] < 1e-3 and rec["kept_frac"] == 0.0035
    assert {"device", "torch", "triton", "us_kernel", "us_fp16_linear", "gb_per_s", "avg_bits"} <= set(rec)
    assert (tmp_path / "dequant_24x640_b3_g64.json").exists() and calls


def test_decode_bench_decodes_as_generate_does_and_records_both_models(tmp_path):
    """bench_decode's static-cache loop gives model.generate's greedy tokens; its CPU smoke run writes a record."""
    import torch

    bench = load("bench_decode")
    model = bench.random_model("tiny", torch.float32, None)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(25)  # std 0.5 instead of 0.02, so greedy tokens vary
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    out = bench.decode(model, prompt, 6, graph=False, warmup=2)
    ref = model.generate(prompt, max_new_tokens=9, min_new_tokens=9, do_sample=False)[0, 8:].tolist()
    assert out["tokens"] == ref and len(set(ref)) > 1 and out["tokens_per_s"] > 0
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--new-tokens", "3",
                       "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "decode_tiny_3bit.json").read_text())
    assert set(rec["eager"]) == {"float32_linear", "packed", "speedup"} and rec["cuda_graph"] == {}
    assert len(rec["eager"]["packed"]["tokens"]) == 1 + 3 + 3  # prefill, warm-up steps, timed steps
    assert rec["linear_bytes"]["packed"] < rec["linear_bytes"]["float32_linear"] / 5
    if not torch.cuda.is_available():
        assert bench.main(["--shape", "tiny", "--device", "cuda", "--out", str(tmp_path)]) == 2


def test_checkpointing_bench_gives_the_same_G_three_ways(tmp_path):
    bench = load("bench_checkpointing")
    out = tmp_path / "ck.json"
    assert bench.main(["--tiny", "--n", "2", "--seq-len", "24", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["mode"] for r in rec["rows"]] == ["plain", "selective", "full"] and rec["same_G"]
    assert all(r["seconds"] > 0 and r["peak_above_start_mib"] >= 0 for r in rec["rows"])


def test_the_gemv_compiles_for_hopper_without_shuffles_in_its_loop(tmp_path):
    """bench/compile_sm90.py in its own process (the test session runs Triton's interpreter): every case
    compiles for sm_90a, no loop step reduces across threads, and the default configuration does not spill."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sm90.json"
    done = subprocess.run([sys.executable, str(BENCH / "compile_sm90.py"), "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]  # (the module is not imported here: it unsets TRITON_INTERPRET)
    assert len(cases) >= 10 and {c["M"] for c in cases} >= {1, 16} and {c["bits"] for c in cases} >= {2, 3, 4, 8}
    assert all(c["loop"]["shuffles"] == 0 and c["loop"]["instructions"] > 0 for c in cases)
    default = next(c for c in cases if (c["bits"], c["M"], c["BLOCK_N"], c["SPLIT_K"], c["kept"]) == (3, 1, 16, 1, True))
    assert default["spill_bytes"] == 0
