import nbformat
import pytest
import torch

from tacq_lite.core import pack, quant
from tacq_lite.course import exercises as ex
from tacq_lite.course import student

# ------------------------------------------------------------------ the reference solutions pass


# The solutions live here, not in the installed package, so a student cannot import the answer.
def gptq_update_solution(W, U, i, q):
    """Column i set to q, its error (w − q) / U[i, i] spread over the later columns along U[i, i+1:]."""
    W = W.clone()
    err = (W[:, i] - q) / U[i, i]  # [rows]
    W[:, i] = q
    W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    return W


def tacq_score_solution(W, G, QW):
    return W.abs() * G.abs() * (QW - W).abs()


def test_reference_solutions_pass(capsys):
    ex.check_rtn_params(lambda W, bits: quant.find_params(W, bits=bits))
    ex.check_gptq_update(gptq_update_solution)
    ex.check_tacq_score(tacq_score_solution)
    ex.check_pack3(lambda c: pack.pack(c, bits=3))
    assert capsys.readouterr().out.count("✓") == 4


# ------------------------------------------------------------------ each usual mistake is named


def _rtn(levels_minus=1, rounded=True, sign=1, keepdim=True):
    def fn(W, bits):
        lo = W.min(1, keepdim=keepdim).values
        hi = W.max(1, keepdim=keepdim).values
        scale = (hi - lo) / (2**bits - levels_minus)
        zero = sign * -lo / scale
        return scale, torch.round(zero) if rounded else zero
    return fn


@pytest.mark.parametrize("fn, message", [
    (_rtn(levels_minus=0), "2\\*\\*bits = 8 levels"),
    (_rtn(rounded=False), "not rounded"),
    (_rtn(sign=-1), "wrong sign"),
    (_rtn(keepdim=False), "shape \\(6,\\), expected \\(6, 1\\)"),
    (lambda W, bits: None, "return a pair"),
    (lambda W, bits: (None, None), "scale is None"),
    (lambda W, bits: 1 / 0, "raised ZeroDivisionError"),
])
def test_rtn_mistakes(fn, message):
    with pytest.raises(ex.ExerciseError, match=message):
        ex.check_rtn_params(fn)


def _gptq(kind):
    def fn(W, U, i, q):
        err = (W[:, i] - q) / U[i, i]
        W = W.clone()
        if kind == "plus":
            W[:, i + 1:] += err[:, None] * U[i, i + 1:]
        elif kind == "nodiv":
            W[:, i + 1:] -= (W[:, i] - q)[:, None] * U[i, i + 1:]
        elif kind == "column":
            W[:, i + 1:] -= err[:, None] * U[i + 1:, i]
        elif kind == "noop":
            return W
        W[:, i] = q
        return W
    return fn


@pytest.mark.parametrize("kind, message", [("plus", "sign error"), ("nodiv", "not divided by U\\[i, i\\]"),
                                           ("column", "row U\\[i, i\\+1:\\]"), ("noop", "unchanged")])
def test_gptq_mistakes(kind, message):
    with pytest.raises(ex.ExerciseError, match=message) as err:
        ex.check_gptq_update(_gptq(kind))
    # notebook 02 calls the factor U and the column i: the message must not speak of other names
    assert "Hinv" not in str(err.value) and "[j" not in str(err.value) and "j=" not in str(err.value)


@pytest.mark.parametrize("fn, message", [
    (lambda W, G, QW: W * G * (QW - W), "negative"),
    (lambda W, G, QW: G * (QW - W).abs(), "`qal`"),
    (lambda W, G, QW: W.abs() * G, "`msg`"),
    (lambda W, G, QW: W.abs() * G ** 2 * (QW - W).abs(), "Fisher"),
    (lambda W, G, QW: (W.abs() * G * (QW - W).abs()).sum(1), "shape"),
])
def test_tacq_score_mistakes(fn, message):
    with pytest.raises(ex.ExerciseError, match=message):
        ex.check_tacq_score(fn)


def _pack(per=10, reverse=False, ceil=True):
    def fn(codes):
        rows, cols = codes.shape
        words = -(-cols // per) if ceil else cols // per
        q = torch.zeros(rows, -(-cols // per) * per, dtype=torch.int64)
        q[:, :cols] = codes.long()
        q = q[:, : words * per]
        shifts = 3 * (torch.arange(per - 1, -1, -1) if reverse else torch.arange(per))
        acc = (q.reshape(rows, words, per) << shifts).sum(-1)
        return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    return fn


@pytest.mark.parametrize("fn, message", [
    (_pack(reverse=True), "reverse order"),
    (_pack(ceil=False), "round the word count up"),
    (_pack(per=8), "4-bit layout"),
    (lambda c: pack.pack(c, bits=3).to(torch.int64), "must be int32"),
])
def test_pack3_mistakes(fn, message):
    with pytest.raises(ex.ExerciseError, match=message):
        ex.check_pack3(fn)


def test_unwritten_stub_is_reported():
    def stub(*_a, **_kw):  # check_dequant_groups passes bits, cols, groupsize by keyword
        raise NotImplementedError("exercise: write this part")

    for check in ex.CHECKERS.values():
        with pytest.raises(ex.ExerciseError, match="not written yet"):
            check(stub)


# ------------------------------------------------------------------ student copies


def test_strip_solutions_keeps_indentation_and_rejects_bad_markers():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\nprint(f)"
    out = student.strip_solutions(src)
    assert "x + 1" not in out and '    raise NotImplementedError("exercise: write this part")' in out
    assert out.startswith("def f(x):") and out.endswith("print(f)")
    with pytest.raises(ValueError, match="without END"):
        student.strip_solutions("### BEGIN SOLUTION\nx = 1")
    with pytest.raises(ValueError, match="without BEGIN"):
        student.strip_solutions("x = 1\n### END SOLUTION")


def _exercise_notebook(path):
    nb = nbformat.v4.new_notebook()
    ex_cell = nbformat.v4.new_code_cell(
        "def my_score(W, G, QW):\n    ### BEGIN SOLUTION\n    return W.abs() * G.abs() * (QW - W).abs()\n"
        "    ### END SOLUTION")
    ex_cell.metadata["tags"] = ["exercise"]
    check = nbformat.v4.new_code_cell("from tacq_lite.course.exercises import check_tacq_score\ncheck_tacq_score(my_score)")
    check.metadata["tags"] = ["check"]
    nb.cells = [nbformat.v4.new_code_cell("import torch"), ex_cell, check, nbformat.v4.new_code_cell("done = True")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_student_copy_runs_and_shows_the_checker_message(tmp_path):
    papermill = pytest.importorskip("papermill")
    from tacq_lite import cli

    src = tmp_path / "src" / "09_demo.ipynb"
    src.parent.mkdir()
    _exercise_notebook(src)
    papermill.execute_notebook(str(src), str(tmp_path / "solved.ipynb"), progress_bar=False)  # the solution passes
    assert cli.main(["student", str(src), "--out", str(tmp_path / "student")]) == 0
    copy = tmp_path / "student" / "09_demo.ipynb"
    assert "W.abs() * G.abs()" not in copy.read_text()
    ran = tmp_path / "ran.ipynb"
    with pytest.raises(papermill.PapermillExecutionError, match="ExerciseError"):
        papermill.execute_notebook(str(copy), str(ran), progress_bar=False)  # runs to the end, then reports
    nb = nbformat.read(ran, 4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ExerciseError" and "not written yet" in errors[0].evalue
    assert nb.cells[-1].execution_count is not None  # the cells after the failing check still ran
    assert cli.main(["student", str(src), "--out", str(src.parent)]) == 2  # never overwrite the solutions


def test_student_copies_never_overwrite_without_asking(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _exercise_notebook(src / "09_demo.ipynb")
    _exercise_notebook(src / "10_more.ipynb")
    out = tmp_path / "student"
    out.mkdir()
    (out / "10_more.ipynb").write_text("the student's own work")
    notebooks = sorted(src.glob("*.ipynb"))
    with pytest.raises(FileExistsError, match=r"10_more\.ipynb already exists; pass --overwrite to replace it"):
        student.make_student_copies(notebooks, out)
    assert (out / "10_more.ipynb").read_text() == "the student's own work"
    assert not (out / "09_demo.ipynb").exists()  # refused before writing anything
    assert student.make_student_copies(notebooks, out, overwrite=True) == {"09_demo.ipynb": 1, "10_more.ipynb": 1}
    assert "NotImplementedError" in nbformat.read(out / "10_more.ipynb", 4).cells[1].source
    assert sorted(p.name for p in out.iterdir()) == ["09_demo.ipynb", "10_more.ipynb"]  # no temporary files left


# ------------------------------------------------------------------ notebook 05: a Triton dequant kernel with groups

try:  # the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, conftest.py)
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton: these tests are skipped
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")

ROW_GROUP, PER_ROW, NO_ROW, TRANSPOSED, GS_PLUS_1, NO_ZERO, ZERO_AFTER, OLD_BROADCAST, STUB = range(1, 10)


if triton is not None:
    @triton.jit
    def _dequant_groups(packed_ptr, scale_ptr, zero_ptr, out_ptr, rows, cols, words_per_row, n_groups, groupsize,
                        BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        MISTAKE: tl.constexpr):
        """The reference solution of notebook 05's exercise (MISTAKE = 0) and its usual mistakes."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (r[:, None] < rows) & (c[None, :] < cols)
        word = tl.load(packed_ptr + r[:, None] * words_per_row + c[None, :] // PER_WORD, mask=ok, other=0)
        q = ((word >> ((c[None, :] % PER_WORD) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        if MISTAKE == STUB:
            raise NotImplementedError("exercise: write this part")
        g = c[None, :] // groupsize + 0 * r[:, None]  # [BLOCK_R, BLOCK_C]
        off = r[:, None] * n_groups + g
        if MISTAKE == ROW_GROUP:
            off = r[:, None] * n_groups + r[:, None] // groupsize + 0 * c[None, :]
        if MISTAKE == PER_ROW:
            off = r[:, None] + 0 * c[None, :]
        if MISTAKE == NO_ROW:
            off = g
        if MISTAKE == TRANSPOSED:
            off = g * rows + r[:, None]
        if MISTAKE == GS_PLUS_1:
            off = r[:, None] * n_groups + c[None, :] // (groupsize + 1)
        s = tl.load(scale_ptr + off, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + off, mask=ok, other=0.0).to(tl.float32)
        w = s * (q - z)
        if MISTAKE == NO_ZERO:
            w = s * q
        if MISTAKE == ZERO_AFTER:
            w = s * q - z
        if MISTAKE == OLD_BROADCAST:
            w = s[:, None] * (q - z[:, None])
        tl.store(out_ptr + r[:, None] * cols + c[None, :], w, mask=ok)


def dequant_groups_solution(mistake=0):
    def launch(packed, scale, zero, *, bits, cols, groupsize):
        rows = packed.shape[0]
        out = torch.empty(rows, cols, dtype=torch.float32)
        grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 64))
        _dequant_groups[grid](packed, scale, zero, out, rows, cols, packed.shape[1], scale.shape[1], groupsize,
                              BITS=bits, PER_WORD=pack.codes_per_word(bits), BLOCK_R=16, BLOCK_C=64, MISTAKE=mistake)
        return out

    return launch


@needs_triton
def test_dequant_groups_reference_passes(capsys):
    ex.check_dequant_groups(dequant_groups_solution())
    assert "✓ dequant_groups matches" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, message", [
    (ROW_GROUP, "comes from the row"),
    (PER_ROW, "read at `scale_ptr \\+ r`"),
    (NO_ROW, "row offset is missing"),
    (TRANSPOSED, "as if they were \\[n_groups, rows\\]"),
    (GS_PLUS_1, "groupsize \\+ 1"),
    (NO_ZERO, "zero is not subtracted"),
    (ZERO_AFTER, "after scaling"),
    (OLD_BROADCAST, "without \\[:, None\\]"),
    (STUB, "not written yet"),
])
@needs_triton
def test_dequant_groups_mistakes(mistake, message):
    with pytest.raises(ex.ExerciseError, match=message):
        ex.check_dequant_groups(dequant_groups_solution(mistake))


@pytest.mark.parametrize("fn, message", [
    (lambda packed, scale, zero, *, bits, cols, groupsize: torch.full((packed.shape[0], cols), float("nan")), "NaN"),
    (lambda packed, scale, zero, *, bits, cols, groupsize: torch.zeros(cols, packed.shape[0]), "has shape"),
    (lambda packed, scale, zero, *, bits, cols, groupsize: None, "forget `return`"),
])
def test_dequant_groups_launcher_mistakes(fn, message):
    with pytest.raises(ex.ExerciseError, match=message):
        ex.check_dequant_groups(fn)
