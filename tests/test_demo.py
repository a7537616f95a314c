"""`tacq-lite demo` (run/demo.py): full precision, GPTQ and TaCQ side by side, on a tiny random Llama.

The demo loads one model and quantizes a deep copy of it per method; the order tests check that no
method runs on weights another method has already quantized, and that the full-precision row and the
KL reference come from the untouched model.
"""
import json
import re

import pytest

from tacq_lite import cli
from tacq_lite.io import PACKAGE_ROOT
from tacq_lite.run import demo, experiment

SMALL = ["--eval-tokens", "256", "--seq-len", "32", "--n-calib", "2", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama whose word-level tokenizer has a chat template, saved as a Hugging Face folder."""
    from fakes import CHAT_TEMPLATE, word_tokenizer

    from tacq_lite.model.loading import tiny_llama

    folder = tmp_path_factory.mktemp("tiny") / "chat"
    tok = word_tokenizer(CHAT_TEMPLATE)
    tiny_llama(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_config(chat_model, tmp_path_factory):
    return demo.DEMO_CONFIG.replace(model=str(chat_model), eval_tokens=256, seq_len=32, n_calib=2,
                                    cache_dir=str(tmp_path_factory.mktemp("scores")))


@pytest.fixture(scope="module")
def records(small_config):
    return demo.run_demo(small_config, max_new_tokens=3, progress=False)


def ppl(record) -> dict:
    return record["metrics"]["wikitext2"]


def test_three_rows_in_order_on_the_same_windows(records):
    assert [r["method"] for r in records] == ["fp", "gptq", "tacq"]
    fp, gptq, tacq = map(ppl, records)
    assert fp["kl"] is None and gptq["kl"] > 0 and tacq["kl"] > 0  # KL against full precision, quantized rows only
    assert len({m["n_windows"] for m in (fp, gptq, tacq)}) == 1 and fp["n_windows"] == 8  # 256 tokens / 32
    # The KL reference is the full-precision model the fp row evaluated (its perplexity summed in another order).
    assert gptq["ref_ppl"] == tacq["ref_ppl"] == pytest.approx(fp["ppl"], rel=1e-7)
    assert gptq["window_nll"] != fp["window_nll"] and tacq["window_nll"] != gptq["window_nll"]  # each did something
    assert records[0]["avg_bits"] == 16 and 3 < records[1]["avg_bits"] < records[2]["avg_bits"]
    assert records[2]["n_kept"] > 0 and records[1]["n_kept"] == 0
    for r in records:
        assert r["config"]["bits"] == 3 and r["config"]["ratio"] == 0.0035 and r["config"]["mse"] is False
        [g] = r["generations"]
        assert g["prompt"] == demo.DEMO_PROMPT and g["chat_template"] is True and g["max_new_tokens"] == 3
        assert r["seconds_total"] == pytest.approx(sum(r["seconds"].values()))
    assert "load" in records[0]["seconds"] and "load" not in records[1]["seconds"]  # shared stages on the fp row


def test_no_row_is_quantized_on_top_of_another(records, small_config):
    """Run backwards: had the model been quantized in place, GPTQ would round TaCQ's weights and the fp row
    would evaluate a quantized model. Every row is the same whatever ran before it."""
    backwards = demo.run_demo(small_config, methods=("tacq", "gptq", "fp"), max_new_tokens=3, progress=False)
    by_method = {r["method"]: r for r in backwards}
    for r in records:
        assert ppl(by_method[r["method"]])["window_nll"] == ppl(r)["window_nll"], r["method"]
        assert by_method[r["method"]]["generations"] == r["generations"]
    assert by_method["tacq"]["kept_per_layer"] == records[2]["kept_per_layer"]


@pytest.mark.parametrize("row", [1, 2])
def test_a_quantized_row_is_what_run_quantize_gives(records, small_config, row):
    alone = experiment.run_quantize(small_config.replace(method=records[row]["method"]), progress=False)
    assert ppl(alone)["window_nll"] == ppl(records[row])["window_nll"]
    assert ppl(alone)["kl"] == pytest.approx(ppl(records[row])["kl"], rel=1e-9)
    assert alone["avg_bits"] == records[row]["avg_bits"]


def test_the_printout_names_every_method_an_interval_three_completions_and_real_notebooks(records):
    text = demo.format_demo(records)
    table, completions, guide = text.split("\n\n")
    rows = [line.split() for line in table.splitlines()[2:5]]
    assert [row[0] for row in rows] == ["fp", "gptq", "tacq"]
    assert all(re.search(r"\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]", line) for line in table.splitlines()[2:5])
    assert "95 % bootstrap interval" in table and "8 windows × 31 predicted tokens" in table
    lines = completions.splitlines()
    assert demo.DEMO_PROMPT in lines[0] and "chat template" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["fp", "gptq", "tacq"]
    cited = set(re.findall(r"\b0\d_\w+", guide))
    assert {"00_setup", "02_gptq", "03_contrastive_importance", "04_outlier_masking", "06_evaluation"} <= cited
    missing = [n for n in cited if not (PACKAGE_ROOT / "notebooks" / f"{n}.ipynb").is_file()]
    assert not missing, f"the guide points to notebooks that do not exist: {missing}"


def test_cli_demo_prints_the_table_and_writes_all_records(chat_model, tmp_path, capsys):
    out = tmp_path / "demo.json"
    argv = ["demo", "--model", str(chat_model), *SMALL, "--cache-dir", str(tmp_path / "c"), "--json", str(out), "-q"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "How to read this" in stdout and f"wrote {out}" in stdout
    saved = json.loads(out.read_text())["records"]
    assert [r["method"] for r in saved] == ["fp", "gptq", "tacq"]
    assert demo.format_demo(saved) in stdout  # the file holds what was printed


def test_demo_flags_map_onto_the_demo_config():
    import argparse

    p = argparse.ArgumentParser()
    cli._add_demo_args(p)
    assert cli.config_from_args(p.parse_args([]), base=demo.DEMO_CONFIG) == demo.DEMO_CONFIG
    cfg = cli.config_from_args(p.parse_args(["--eval-tokens", "1024", "--n-calib", "4"]), base=demo.DEMO_CONFIG)
    assert (cfg.eval_tokens, cfg.n_calib, cfg.mse, cfg.evals) == (1024, 4, False, ("wikitext2",))


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_a_bad_json_path_fails_in_one_line_before_any_work(where, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "demo.json" if where == "under_a_file" else tmp_path
    # The model does not exist either: the --json check must come first, before anything is loaded.
    assert cli.main(["demo", "--model", str(tmp_path / "no-model"), "--json", str(path), "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("tacq-lite: error: --json") and "Traceback" not in err


def test_bad_demo_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="prompt is empty"):
        demo.run_demo(demo.DEMO_CONFIG.replace(model=str(tmp_path / "none")), prompt="  ")
    with pytest.raises(ValueError, match="distinct names"):
        demo.run_demo(demo.DEMO_CONFIG.replace(model=str(tmp_path / "none")), methods=("gptq", "gptq"))
