import pytest
from fakes import tiny_data, write_csv, write_jsonl  # noqa: F401 (fixture)

from tacq_lite.data import calibration, tasks
from tacq_lite.data.tasks import GSM8KItem, MMLUItem, TaskSample


def test_shared_data_dir_follows_the_environment(tiny_data, monkeypatch):
    assert tasks.shared_data_dir() == tiny_data
    monkeypatch.setenv("TACQ_LITE_DATA", str(tiny_data / "missing"))
    assert tasks.shared_data_dir() is None


def test_categories_cover_each_of_the_57_subjects_once():
    listed = [s for subjects in tasks.CATEGORIES.values() for s in subjects]
    assert len(listed) == len(set(listed)) == len(tasks.SUBJECTS) == 57
    assert set(tasks.CATEGORIES) == {"STEM", "humanities", "social sciences", "other"}
    root = tasks.shared_data_dir()
    if root is not None and (root / "mmlu" / "test").is_dir():
        on_disk = sorted(p.name[: -len("_test.csv")] for p in (root / "mmlu" / "test").glob("*.csv"))
        assert on_disk == list(tasks.SUBJECTS)


def test_load_mmlu_reads_and_validates(tiny_data):
    items = tasks.load_mmlu("astronomy", "test")
    assert items[1] == MMLUItem("test q1?", ("w", "x", "y", "z"), "B")
    with pytest.raises(ValueError, match="Unknown MMLU subject"):
        tasks.load_mmlu("astrology")
    with pytest.raises(ValueError, match="split"):
        tasks.load_mmlu("astronomy", "train")


def test_bad_mmlu_answer_letter_names_file_and_row(tmp_path):
    path = tmp_path / "bad.csv"
    write_csv(path, [["q1", "a", "b", "c", "d", "A"], ["q2", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=r"bad\.csv, row 2: answer must be one of A/B/C/D, got 'E'"):
        tasks.read_mmlu_csv(path)
    write_csv(path, [["q1", "a", "b", "c", "A"]])
    with pytest.raises(ValueError, match="row 1: expected 6 columns"):
        tasks.read_mmlu_csv(path)


def test_mmlu_five_shot_prompt_is_the_standard_format():
    shot = MMLUItem("What is 1+1?", ("1", "2", "3", "4"), "B")
    item = MMLUItem("Which planet is red?", ("Mars", "Venus", "Earth", "Moon"), "A")
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which planet is red?\nA. Mars\nB. Venus\nC. Earth\nD. Moon\nAnswer:"
    )
    assert tasks.mmlu_prompt("high_school_physics", item, [shot]) == expected


def test_gsm8k_prompt_format_and_calculator_notes_removed():
    shot = GSM8KItem("Tom has 2 apples and buys 3. How many?", "2 + 3 = <<2+3=5>>5 apples.\n#### 5")
    expected = ("Question: Tom has 2 apples and buys 3. How many?\nAnswer: 2 + 3 = 5 apples.\n#### 5\n\n"
                "Question: What is 6 * 7?\nAnswer:")
    assert tasks.gsm8k_prompt("What is 6 * 7?", [shot]) == expected


def test_gsm8k_loading_and_validation(tiny_data, tmp_path):
    assert tasks.load_gsm8k("train")[0] == GSM8KItem("train 0 + 1?", "0 + 1 = <<0+1=1>>1\n#### 1")
    assert [s.question for s in tasks.gsm8k_shots(3)] == ["train 0 + 1?", "train 1 + 1?", "train 2 + 1?"]
    assert tasks.gsm8k_shots(3, seed=1) == tasks.gsm8k_shots(3, seed=1)
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"question": "q"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: missing string field\(s\) \['answer'\]"):
        tasks.read_gsm8k_jsonl(bad)
    write_jsonl(bad, [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match="####"):
        tasks.read_gsm8k_jsonl(bad)


def test_calibration_pairs_from_gsm8k_train_and_user_jsonl(tiny_data, tmp_path):
    pairs = calibration.calibration_pairs("gsm8k", n=3, seed=0)
    assert len(pairs) == 3 and all(isinstance(p, TaskSample) for p in pairs)
    assert all(p.prompt.startswith("Question: train") and p.prompt.endswith("\nAnswer:") for p in pairs)
    assert all("<<" not in p.answer and "####" in p.answer for p in pairs)
    assert pairs == calibration.calibration_pairs("gsm8k", n=3, seed=0)
    user = tmp_path / "mine.jsonl"
    write_jsonl(user, [{"prompt": f"p{i}", "answer": f" a{i}"} for i in range(5)])
    assert sorted(calibration.calibration_pairs(str(user), n=10, seed=0)) == [TaskSample(f"p{i}", f" a{i}") for i in range(5)]
    write_jsonl(user, [{"prompt": "p"}])
    with pytest.raises(ValueError, match="missing string field"):
        calibration.calibration_pairs(str(user), n=1)


def test_calibration_pairs_rejects_unknown_names_and_bad_n():
    with pytest.raises(ValueError, match="Unknown calibration task 'wikitext'.*mmlu.*gsm8k.*synthetic:copy"):
        calibration.calibration_pairs("wikitext", n=1)
    with pytest.raises(ValueError, match="n must be positive"):
        calibration.calibration_pairs("gsm8k", n=0)
    with pytest.raises(ValueError, match="Unknown synthetic task"):
        calibration.calibration_pairs("synthetic:nope", n=1)


def test_mmlu_calibration_never_uses_the_test_split():
    if tasks.shared_data_dir() is None:
        pytest.skip("needs the reference MMLU data")
    pairs = calibration.calibration_pairs("mmlu", n=200, seed=0)
    assert {p.answer for p in pairs} <= {" A", " B", " C", " D"}
    test_questions = {item.question for s in tasks.SUBJECTS for item in tasks.load_mmlu(s, "test")}
    used = {p.prompt.split("\n\n", 1)[1].rsplit("\nA. ", 1)[0] for p in pairs}
    assert len(used) > 150 and not used & test_questions
