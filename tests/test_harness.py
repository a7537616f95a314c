"""lm-evaluation-harness as an evaluator (tacq_lite.eval.harness): parity with tacq_lite's own MMLU.

What the parity tests compare. The project task `tacq_mmlu_<subject>` is
lm-eval's `mmlu_<subject>` (lm_eval/tasks/mmlu/default/_default_template_yaml) with the data read
from the shared CSVs; `test_project_tasks_restate_lm_eval_configs` checks every prompt and scoring
field against the installed lm-eval. Both evaluators then use the same few-shot examples (lm-eval's
`first_n` sampler over dev = tacq_lite's first 5 dev rows, in file order), the same header, the
same "Answer:" ending and the same letter tokens " A".." D"; lm-eval scores log p(letter | prompt)
over the whole vocabulary, tacq_lite log-softmaxes the four letter logits, which has the same argmax.
tacq_lite strips each question as lm-eval does (`question.strip()`), so the prompts are the same
text in every subject, including the 20 where questions carry whitespace (nutrition, ...).
"""
import math

import pytest
import torch
import yaml
from fakes import tiny_data  # noqa: F401 (fixture)

from tacq_lite import cli
from tacq_lite.data import tasks
from tacq_lite.eval import harness
from tacq_lite.eval.mmlu_gsm8k import GSM8KResult, gsm8k_protocol, mmlu_eval
from tacq_lite.model.loading import tiny_llama
from tacq_lite.run import experiment

PARITY_SUBJECTS = ("management", "nutrition")  # short prompts; nutrition's questions carry whitespace


def _lm_eval_yaml(*parts) -> dict:
    """An installed lm-eval task file, read as plain YAML (the two read here hold no !function tags)."""
    from pathlib import Path

    import lm_eval.tasks

    return yaml.safe_load(Path(lm_eval.tasks.__file__).parent.joinpath(*parts).read_text())


def _project_config(name: str) -> dict:
    """A project task's config as lm-eval's own index resolves it (include merged)."""
    return dict(harness._task_manager(name).task_index[name].cfg)


def _shared_mmlu_or_skip():
    from tacq_lite.data.corpus import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "mmlu").is_dir():
        pytest.skip("needs the shared MMLU CSVs (../shared/data/mmlu)")


@pytest.fixture(scope="module")
def embedded_tok(embedded_gguf):
    from tacq_lite.model.loading import load_model

    return load_model()[1]


def _agreement(ours, theirs: list[harness.HarnessResult]) -> tuple[float, float]:
    """(share of questions with the same predicted letter, lm-eval's accuracy over them)."""
    preds = [s.prediction for r in theirs for docs in r.samples.values() for s in docs]
    scores = [s.score for r in theirs for docs in r.samples.values() for s in docs]
    assert len(preds) == len(ours.item_choice)
    return sum(a == b for a, b in zip(preds, ours.item_choice)) / len(preds), sum(scores) / len(scores)


def _check_parity(model, tok, per_subject: int) -> tuple[float, float, float]:
    ours = mmlu_eval(model, tok, subjects=list(PARITY_SUBJECTS), max_per_subject=per_subject, progress=False)
    theirs = [harness.evaluate(model, tok, f"tacq_mmlu_{s}", limit=per_subject) for s in PARITY_SUBJECTS]
    assert [len(r.samples[r.task]) for r in theirs] == [per_subject] * len(PARITY_SUBJECTS)
    agree, accuracy = _agreement(ours, theirs)
    assert agree >= 0.99
    if agree == 1.0:
        assert accuracy == pytest.approx(ours.overall, abs=1e-6)
    return agree, accuracy, ours.overall


# --------------------------------------------------------------------------- configs and prompts

def test_project_tasks_restate_lm_eval_configs():
    data_keys = {"dataset_path", "dataset_name", "custom_dataset", "dataset_kwargs", "task", "task_alias", "tag",
                 "include", "num_fewshot"}
    template = _lm_eval_yaml("mmlu", "default", "_default_template_yaml")
    assert set(harness.project_tasks()) == {"tacq_mmlu", "tacq_gsm8k_cot"} | {f"tacq_mmlu_{s}" for s in tasks.SUBJECTS}
    for subject in tasks.SUBJECTS:
        theirs = {**template, **_lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml")}
        ours = _project_config(f"tacq_mmlu_{subject}")
        assert {k: v for k, v in ours.items() if k not in data_keys} == \
               {k: v for k, v in theirs.items() if k not in data_keys}, subject
        assert ours["description"] == tasks.mmlu_prefix(subject, [])  # and tacq_lite's header
        assert ours["num_fewshot"] == tasks.MMLU_SHOTS and ours["dataset_kwargs"] == {"subject": subject}
    theirs = _lm_eval_yaml("gsm8k", "gsm8k-cot.yaml")
    ours = _project_config("tacq_gsm8k_cot")
    samples = theirs["fewshot_config"].pop("samples")
    assert ours["fewshot_config"].pop("samples") is not None and harness.gsm8k_cot_exemplars() == samples
    assert len(samples) == 8
    assert {k: v for k, v in ours.items() if k not in data_keys} == \
           {k: v for k, v in theirs.items() if k not in data_keys}


def test_prompts_are_tacq_lites():
    """lm-eval's 5-shot context for a document is tacq_lite's prompt, character for character, also
    where the CSV has whitespace around a question (nutrition: every dev and test question)."""
    _shared_mmlu_or_skip()
    manager = harness._task_manager("tacq_mmlu_management")
    for subject in ("management", "nutrition"):
        task = manager.load([f"tacq_mmlu_{subject}"])["tasks"][f"tacq_mmlu_{subject}"]
        dev = tasks.load_mmlu(subject, "dev")
        assert (subject == "nutrition") == any(d.question != d.question.strip() for d in dev)
        for doc, item in list(zip(task.test_docs(), tasks.load_mmlu(subject, "test")))[:3]:
            context = task.fewshot_context(doc=doc, num_fewshot=tasks.MMLU_SHOTS)
            assert context == tasks.mmlu_prompt(subject, item, dev)
            assert task.doc_to_choice(doc)[doc["answer"]] == item.answer


# --------------------------------------------------------------------------- per-question parity

def test_mmlu_parity_on_a_quantized_model_saved_and_loaded(embedded_tok, tmp_path):
    """Fast: a tiny random Llama with the embedded model's tokenizer, RTN 4-bit, saved and loaded
    from disk (packed QuantLinears); 2 subjects x 10 questions."""
    _shared_mmlu_or_skip()
    from tacq_lite.config import QuantConfig
    from tacq_lite.model.checkpoint import load_quantized

    model = tiny_llama(vocab=len(embedded_tok))
    result = experiment.quantize_model(model, None, QuantConfig(method="rtn", bits=4, groupsize=32, mse=False),
                                       progress=False)
    experiment.save_packed(model, embedded_tok, result, str(tmp_path / "q4"))
    loaded, tok, _ = load_quantized(tmp_path / "q4")
    agree, accuracy, ours = _check_parity(loaded.eval(), tok, per_subject=10)
    assert agree == 1.0


@pytest.mark.slow
def test_mmlu_parity_on_the_embedded_model():
    """SmolLM2-135M, 5-shot, 2 subjects x 20 test questions: the Done criterion of issue 23.
    Measured (management, nutrition): 40/40 letters agree, accuracy 0.300 both ways; about 45 s on 2 idle cores (tacq_lite's path
    reuses the few-shot prefix's key/value cache, lm-eval's runs each prompt whole)."""
    _shared_mmlu_or_skip()
    from tacq_lite.model.loading import embedded_gguf_path, load_model

    try:
        embedded_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tok = load_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest's single thread would double the time
    try:
        agree, accuracy, ours = _check_parity(model, tok, per_subject=20)
    finally:
        torch.set_num_threads(threads)
    assert agree == 1.0 and math.isfinite(accuracy)


# --------------------------------------------------------------------------- bad input

def test_unknown_task_names_are_one_line_errors():
    with pytest.raises(ValueError, match="tacq_mmlu_<subject> takes one of the 57"):
        harness.check_task("tacq_mmlu_astronomyy")
    with pytest.raises(ValueError, match=r"lm-eval has no task 'no_such_task_xyz'.*lm-eval ls tasks"):
        harness.check_task("no_such_task_xyz")
    with pytest.raises(ValueError, match=r"'ai2_arc' is a tag without one overall score.*arc_challenge, arc_easy"):
        harness.check_task("ai2_arc")  # a tag: no headline to report, refused before any model work


def test_documents_without_a_numeric_score_get_nan():
    """Corpus-level metrics log a tuple per document (word_perplexity: (loglikelihood, words))."""
    docs = [{"doc_id": 1, "target": "", "filtered_resps": [-3.0], "word_perplexity": (-3.0, 2), "filter": "none"},
            {"doc_id": 0, "target": "", "filtered_resps": [-1.0], "word_perplexity": 2.5, "filter": "none"}]
    picked = harness._samples(docs, {"output_type": "loglikelihood_rolling"}, "word_perplexity,none")
    assert [s.doc_id for s in picked] == [0, 1] and picked[0].score == 2.5 and math.isnan(picked[1].score)


def test_missing_offline_data_names_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TACQ_LITE_DATA", str(tmp_path))  # an empty data folder
    with pytest.raises(ValueError, match=r"reads mmlu/dev/astronomy_dev.csv offline.*TACQ_LITE_DATA"):
        harness.check_task("tacq_mmlu_astronomy")
    with pytest.raises(ValueError, match="reads gsm8k/test.jsonl offline"):
        harness.check_task("tacq_gsm8k_cot")
    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "astronomy_dev.csv").write_text("q?,a,b,c,d,A\n")
    with pytest.raises(ValueError, match="reads mmlu/test/astronomy_test.csv offline"):
        harness.check_task("tacq_mmlu_astronomy")
    with pytest.raises(ValueError, match="reads mmlu/dev/abstract_algebra_dev.csv"):  # the group: every subject
        harness.check_task("tacq_mmlu")


def test_an_lm_eval_task_without_cached_data_says_so(tmp_path, monkeypatch):
    """An installed lm-eval task whose Hugging Face dataset is neither cached nor reachable."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # and an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"could not read the Hugging Face dataset 'cais/mmlu' \(abstract_algebra\) "
                                         r"offline .* or use tacq_mmlu_<subject>"):
        harness.check_task("mmlu_abstract_algebra")


# --------------------------------------------------------------------------- CLI and tables

@pytest.mark.parametrize("evals, message", [
    ("lm-eval:tacq_mmlu_nope", "tacq_mmlu_<subject> takes one of the 57"),
    ("lm-eval:tacq_mmlu_abstract_algebra", "reads mmlu/dev/abstract_algebra_dev.csv offline"),  # tiny_data: astronomy
    ("lm-eval:", "name an lm-eval task"),
])
@pytest.mark.usefixtures("tiny_data")
def test_cli_rejects_bad_lm_eval_names_before_loading(evals, message, capsys):
    assert cli.main(["eval", "--model", "/no/such/model", "--eval", evals, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("tiny_data")
def test_cli_runs_an_lm_eval_task(embedded_tok, tmp_path, capsys):
    tiny_llama(vocab=len(embedded_tok)).save_pretrained(tmp_path / "m")
    embedded_tok.save_pretrained(tmp_path / "m")
    rc = cli.main(["eval", "--model", str(tmp_path / "m"), "--eval", "lm-eval:tacq_mmlu_astronomy",
                   "--lm-eval-limit", "3", "--no-kl", "--quiet", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    assert "lm-eval:tacq_mmlu_astronomy acc" in capsys.readouterr().out
    import json

    m = json.loads((tmp_path / "r.json").read_text())["metrics"]["lm-eval:tacq_mmlu_astronomy"]
    assert m["metric"] == "acc,none" and m["n"] == 3 and len(m["item_score"]) == 3
    assert m["score"] == pytest.approx(sum(m["item_score"]) / 3)


def test_tables_name_the_gsm8k_protocol_and_lm_eval_metric():
    assert GSM8KResult(0.5, 1.0, 2).protocol == ""  # set by gsm8k_eval
    protocol = gsm8k_protocol(8, 128)
    assert "8-shot" in protocol and "not lm-eval's gsm8k_cot" in protocol
    rec = {"method": "fp", "bits": 16, "avg_bits": 16.0, "seconds_total": 1.0, "metrics": {
        "gsm8k": {"accuracy": 0.25, "nll": 1.5, "protocol": protocol},
        "lm-eval:tacq_gsm8k_cot": {"metric": "exact_match,strict-match", "score": 0.125}}}
    text = experiment.format_table([rec])
    assert "lm-eval:tacq_gsm8k_cot exact_match,strict-match" in text and "0.125" in text
    assert f"gsm8k: {protocol}" in text
    assert not experiment.is_perplexity("lm-eval:tacq_mmlu") and experiment.is_perplexity("wikitext2")
