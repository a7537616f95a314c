import json

import pytest

from tacq_lite import cli
from tacq_lite.config import QuantConfig


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="blocksize"):
        QuantConfig(blocksize=0)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="ratio"):
        QuantConfig(ratio=1.0)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="awq")


@pytest.mark.parametrize("argv, message", [
    (["--bits", "5"], "bits=5"),
    (["--blocksize", "0"], "blocksize"),
    (["--eval", "/no/such/file.txt"], "does not exist"),
])
def test_bad_input_exits_with_a_clear_message(argv, message, capsys):
    assert cli.main(["quantize", "--method", "rtn", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_table_formats_every_eval_set():
    rec = {"method": "rtn", "bits": 3, "avg_bits": 3.0469, "seconds_total": 12.0,
           "metrics": {"a.txt": {"ppl": 12.5, "kl": 0.25}, "wikitext2": {"ppl": 30.0, "kl": 0.75}}}
    text = cli.format_table([rec])
    assert "ppl a.txt" in text and "ppl wikitext2" in text and "3.047" in text and "0.5000" in text


@pytest.mark.slow
def test_rtn_run_writes_the_record(tmp_path):
    from tacq_lite import models

    try:
        models.embedded_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
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
