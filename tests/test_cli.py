import json

import pytest

from tacq_lite import cli
from tacq_lite.config import QuantConfig
from tacq_lite.run import experiment


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="blocksize"):
        QuantConfig(blocksize=0)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="ratio"):
        QuantConfig(ratio=1.0)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="keep_value='exact' is unknown"):
        QuantConfig(keep_value="exact")
    with pytest.raises(TypeError, match="chat_template is True, False or None"):
        QuantConfig(chat_template="yes")


@pytest.mark.parametrize("argv, message", [
    (["--bits", "5"], "bits=5"),
    (["--blocksize", "0"], "blocksize"),
    (["--eval", "/no/such/file.txt"], "nor an existing text file"),
])
def test_bad_input_exits_with_a_clear_message(argv, message, capsys):
    assert cli.main(["quantize", "--method", "rtn", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_table_formats_every_eval_set():
    rec = {"method": "rtn", "bits": 3, "avg_bits": 3.0469, "seconds_total": 12.0,
           "metrics": {"a.txt": {"ppl": 12.5, "kl": 0.25}, "wikitext2": {"ppl": 30.0, "kl": 0.75}}}
    text = experiment.format_table([rec])
    assert "ppl a.txt" in text and "ppl wikitext2" in text and "3.047" in text and "0.5000" in text
    rec["metrics"]["wikitext2"].update(ppl_low=28.25, ppl_high=31.5, n_tokens=8 * 511, n_windows=8)
    text = experiment.format_table([rec])
    assert "30.00 [28.25, 31.50]" in text
    assert "ppl wikitext2: [95 % bootstrap interval over windows], 8 windows × 511 predicted tokens" in text


@pytest.mark.slow
def test_rtn_run_writes_the_record(tmp_path, embedded_gguf):
    text = tmp_path / "eval.txt"
    text.write_text("The history of the city begins with a small harbour and a market. " * 60)
    out = tmp_path / "rec.json"
    rc = cli.main(["quantize", "--method", "rtn", "--bits", "4", "--groupsize", "64", "--no-mse", "--seq-len", "128",
                   "--eval", str(text), "--eval-tokens", "256", "--quiet", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    m = rec["metrics"][str(text)]
    assert rec["config"]["groupsize"] == 64 and rec["avg_bits"] == pytest.approx(4.5)
    assert m["n_tokens"] == 2 * 127 and m["kl"] > 0 and m["ppl"] > m["ref_ppl"] * 0.9
    assert rec["peak_rss_mb"] > 100 and "load" in rec["seconds"]


@pytest.mark.slow
def test_tacq_save_load_generate_end_to_end(tmp_path, embedded_gguf):
    """Embedded model -> TaCQ -> packed save -> load into QuantLinears -> same perplexity, generates."""
    from tacq_lite.core.pack import packed_cols

    text = tmp_path / "text.txt"
    text.write_text("The history of the city begins with a small harbour and a market by the river. " * 80)
    common = ["--eval", str(text), "--eval-tokens", "256", "--seq-len", "128", "--quiet"]
    rc = cli.main(["quantize", "--method", "tacq", "--bits", "3", "--ratio", "0.0035", "--no-mse", "--n-calib", "2",
                   "--calib", str(text), "--cache-dir", str(tmp_path / "cache"), "--save", str(tmp_path / "q3"),
                   "--json", str(tmp_path / "a.json"), *common])
    assert rc == 0
    rc = cli.main(["eval", "--load", str(tmp_path / "q3"), "--prompt", "The capital of France is",
                   "--max-new-tokens", "8", "--json", str(tmp_path / "b.json"), *common])
    assert rc == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    fake, packed = a["metrics"][str(text)], b["metrics"][str(text)]
    # Same weights up to one fp16 rounding of scales and kept values.
    assert packed["ppl"] == pytest.approx(fake["ppl"], rel=2e-3)
    assert packed["ref_ppl"] == pytest.approx(fake["ref_ppl"], rel=1e-6)  # KL reference: the float model again
    assert b["avg_bits"] == pytest.approx(a["avg_bits"]) and b["method"] == "tacq"
    assert len(b["generations"][0]["generation"]) > 0
    assert b["generations"][0]["chat_template"] is True  # the embedded (instruct) tokenizer has one
    # The packed size is the accounting plus exactly its stated overheads: 3-bit codes padded to
    # 10 per int32 word, and the CSR row offsets (int32 per row + 1).
    layers = json.loads((tmp_path / "q3" / "tacq_lite.json").read_text())["layers"]
    disk_bits = 8 * a["saved"]["bytes"]["quantized_linears"]
    padding = sum(L["out_features"] * (32 * packed_cols(L["in_features"], bits=3) - 3 * L["in_features"])
                  for L in layers.values())
    row_ptr = sum(32 * (L["out_features"] + 1) for L in layers.values())
    assert disk_bits == pytest.approx(a["avg_bits"] * a["n_weights"] + padding + row_ptr, abs=0.5)
    assert sum(L["nnz"] for L in layers.values()) == a["n_kept"] > 0


def test_save_target_is_checked_before_work(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("mine")
    assert cli.main(["quantize", "--method", "rtn", "--quiet", "--save", str(tmp_path)]) == 2
    assert "not a tacq_lite model" in capsys.readouterr().err
    assert cli.main(["quantize", "--method", "fp", "--quiet", "--save", str(tmp_path / "new")]) == 2
    assert "nothing to pack" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--eval", "nope"], "neither one of"),
    (["eval"], "nothing to do"),
    (["eval", "--load", "/no/such/dir", "--eval", "wikitext2"], "tacq_lite.json"),
    (["eval", "--mmlu-limit", "0", "--eval", "mmlu"], "mmlu_limit must be a positive"),
    (["quantize", "--eval", "mmlux"], "neither one of"),
])
def test_eval_bad_input(argv, message, capsys):
    assert cli.main([*argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_no_parallel_flag_maps_to_the_config():
    import argparse

    p = argparse.ArgumentParser()
    cli._add_quantize_args(p)
    assert cli.config_from_args(p.parse_args([])).parallel is True
    assert cli.config_from_args(p.parse_args(["--no-parallel"])).parallel is False
    assert cli.config_from_args(p.parse_args([])).keep_value == "compensated"
    assert cli.config_from_args(p.parse_args(["--keep-value", "original"])).keep_value == "original"
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'exact' (choose from compensated, original)"
        p.parse_args(["--keep-value", "exact"])


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Two tiny random Llamas saved as Hugging Face folders: "chat" (its tokenizer has a chat template), "plain"."""
    from fakes import CHAT_TEMPLATE, word_tokenizer

    from tacq_lite.model.loading import tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    for name, template in (("chat", CHAT_TEMPLATE), ("plain", None)):
        tok = word_tokenizer(template)
        tiny_llama(vocab=len(tok)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    text = root / "text.txt"
    text.write_text("the capital of France is Paris ; " * 40)
    return root


def test_eval_prompts_use_the_chat_template_where_the_tokenizer_has_one(tiny_folders, tmp_path, capsys):
    prompt = "the capital of France is"
    argv = ["--prompt", prompt, "--max-new-tokens", "2", "--quiet"]
    for name, flags, used in (("chat", [], True), ("chat", ["--no-chat-template"], False), ("plain", [], False)):
        out = tmp_path / f"{name}{len(flags)}.json"
        assert cli.main(["eval", "--model", str(tiny_folders / name), *argv, *flags, "--json", str(out)]) == 0
        rec = json.loads(out.read_text())
        g = rec["generations"][0]
        assert g["chat_template"] is used and g["prompt"] == prompt
        assert rec["config"]["chat_template"] is (None if not flags else False)  # what was asked
        stdout = capsys.readouterr().out  # the generation and the JSON path are the command's result
        assert cli.format_generation(g) in stdout and f"wrote {out}" in stdout
    assert cli.main(["eval", "--model", str(tiny_folders / "plain"), *argv, "--chat-template"]) == 2
    assert "this tokenizer has no chat template" in capsys.readouterr().err


def test_status_lines_are_log_records_a_user_can_route_or_silence(tiny_folders, caplog, capsys):
    import logging

    from tacq_lite.model.loading import load_model

    model, tok = load_model(str(tiny_folders / "plain"))
    cfg = QuantConfig(evals=(str(tiny_folders / "text.txt"),), seq_len=16, eval_tokens=64)
    with caplog.at_level(logging.INFO, logger="tacq_lite"):
        experiment.run_evals(model, tok, cfg, progress=False)
    status = [r for r in caplog.records if r.name == "tacq_lite.run.experiment"]
    assert [r.levelno for r in status] == [logging.INFO] and "64 tokens from" in status[0].getMessage()
    assert capsys.readouterr().out == ""  # nothing printed behind logging's back
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tacq_lite"):
        experiment.run_evals(model, tok, cfg, progress=False)
    assert not [r for r in caplog.records if r.name.startswith("tacq_lite")]
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("quiet", [False, True])
def test_the_cli_prints_its_result_on_stdout_and_status_lines_on_stderr(tiny_folders, tmp_path, quiet):
    import subprocess
    import sys

    text = tiny_folders / "text.txt"
    argv = ["eval", "--model", tiny_folders / "plain", "--eval", text, "--seq-len", "16", "--eval-tokens", "64",
            "--json", tmp_path / "r.json"] + (["-q"] if quiet else [])
    proc = subprocess.run([sys.executable, "-m", "tacq_lite.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ppl {text}" in proc.stdout and f"wrote {tmp_path / 'r.json'}" in proc.stdout
    assert "tokens from" not in proc.stdout
    assert (f"eval {text}: 64 tokens from" in proc.stderr) is not quiet
