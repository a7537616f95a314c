"""What a bad input or a fault does: a one-line error naming the fix (exit 2, no traceback), nothing
of the user's deleted, no damaged cache used, no orphaned worker, the same model from the same command.

CLI cases run `python -m tacq_lite.cli` in a subprocess on a tiny random Llama saved as a Hugging
Face folder (`tiny_model`), so each one costs seconds.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tacq_lite.config import QuantConfig
from tacq_lite.model.checkpoint import META_FILE, TENSOR_FILE, check_save_target, load_quantized, read_meta
from tacq_lite.model.loading import tiny_llama
from tacq_lite.run import score_cache, tacq

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-calib", "2", "--seq-len", "32", "--no-mse", "--eval-tokens", "256", "--quiet"]


def save_tiny_model(folder: Path, *, nan: bool = False) -> Path:
    """A random 2-layer Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + [chr(c) for c in range(33, 127)] + ["the", "of", "and", "a", "to", "in", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_llama(vocab=256)
    if nan:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tacq_lite.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, phrase: str) -> None:
    """Exit 2, one line on stderr that holds `phrase`, no traceback, no work started."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tacq-lite: error:")]
    assert len(errors) == 1 and phrase in errors[0], proc.stderr[-2000:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ overwrite only what we wrote


def test_overwrite_never_replaces_a_folder_we_did_not_write(tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / META_FILE).write_text('{"my": "settings"}')
    (proj / "src" / "main.py").write_text("code")
    proc = cli("quantize", "--method", "rtn", "--no-mse", "--save", proj, "--overwrite", "--quiet")
    assert_clean_error(proc, "not a valid")
    assert (proj / "src" / "main.py").read_text() == "code"
    assert (proj / META_FILE).read_text() == '{"my": "settings"}'


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory) -> Path:
    """A TaCQ model of the tiny Llama saved by the CLI."""
    out = tmp_path_factory.mktemp("saved") / "q3"
    proc = cli("quantize", "--method", "tacq", "--model", tiny_model, "--ratio", "0.01", "--save", out,
               "--cache-dir", out.parent / "cache", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_saved_model_lists_every_file_and_is_replaced_only_when_it_holds_nothing_else(saved, tmp_path):
    folder = tmp_path / "q3"
    shutil.copytree(saved, folder)
    meta = read_meta(folder)
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != META_FILE)
    assert sorted(meta["files"]) == on_disk and "config.json" in on_disk and TENSOR_FILE in on_disk
    assert all(meta["files"][n]["sha256"] == sha256(folder / n) for n in on_disk)
    check_save_target(folder, overwrite=True)  # only our files: may be replaced
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"does not list \(first: notes.txt\)"):
        check_save_target(folder, overwrite=True)
    (folder / "notes.txt").unlink()
    (folder / "extra").mkdir()
    with pytest.raises(FileExistsError, match="first: extra"):
        check_save_target(folder, overwrite=True)


def test_a_manifest_without_checksums_is_not_loaded(saved, tmp_path):
    folder = tmp_path / "q3"
    shutil.copytree(saved, folder)
    meta = json.loads((folder / META_FILE).read_text())
    del meta["files"]
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lists no checksummed model.safetensors"):
        load_quantized(folder)
    proc = cli("eval", "--load", folder, "--eval", "wikitext2", "--seq-len", "32", "--eval-tokens", "256", "--quiet")
    assert_clean_error(proc, "re-save the model")


def test_a_changed_tokenizer_file_is_caught_on_load(saved, tmp_path):
    folder = tmp_path / "q3"
    shutil.copytree(saved, folder)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("2048", "2049"))
    with pytest.raises(ValueError, match="config.json does not match the sha256"):
        load_quantized(folder)


def test_kl_source_that_moved_is_a_clean_error(saved, tiny_model, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model, moved)
    folder = tmp_path / "q3"
    shutil.copytree(saved, folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["info"]["config"]["model"] = str(tmp_path / "gone")
    (folder / META_FILE).write_text(json.dumps(meta))  # the manifest itself is not checksummed
    evals = ["--eval", "wikitext2", "--seq-len", "32", "--eval-tokens", "256", "--quiet"]
    assert_clean_error(cli("eval", "--load", folder, *evals), "--no-kl")
    proc = cli("eval", "--load", folder, *evals, "--no-kl")
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ outputs checked before any work


@pytest.mark.parametrize("case", ["json_is_dir", "json_under_file", "save_under_file", "cache_is_file",
                                  "json_unwritable", "save_unwritable"])
def test_output_paths_are_checked_before_the_model_loads(case, tmp_path):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    args = {"json_is_dir": ["--json", tmp_path / "adir"],
            "json_under_file": ["--json", tmp_path / "afile" / "r.json"],
            "save_under_file": ["--save", tmp_path / "afile" / "q"],
            "cache_is_file": ["--method", "tacq", "--cache-dir", tmp_path / "afile"],
            "json_unwritable": ["--json", unwritable(tmp_path) / "r.json"],
            "save_unwritable": ["--save", unwritable(tmp_path) / "q"]}[case]
    proc = cli("quantize", "--method", "rtn", "--model", tmp_path / "never-loaded", *args, "--quiet")
    phrase = {"json_is_dir": "is a folder", "json_unwritable": "cannot write", "save_unwritable": "cannot write"}.get(
        case, "is a file, not a folder")
    assert_clean_error(proc, phrase)  # the model path does not exist: it was never reached
    assert (tmp_path / "afile").read_text() == "mine"


def unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write in; root ignores permission bits, so it gets /proc."""
    if os.geteuid() == 0:
        return Path("/proc")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


# ------------------------------------------------------------------ bad settings and bad models


@pytest.mark.parametrize("args, phrase", [
    (["--groupsize", "0"], "groupsize must be -1"),
    (["--percdamp", "nan"], "percdamp must be a finite positive"),
    (["--method", "gptq", "--selector", "bogus"], "selector='bogus' is unknown"),
])
def test_bad_settings_fail_before_loading(args, phrase, tmp_path):
    assert_clean_error(cli("quantize", "--model", tmp_path / "never-loaded", *args, "--quiet"), phrase)


def test_missing_or_broken_model_folders(tiny_model, tmp_path):
    assert_clean_error(cli("quantize", "--method", "rtn", "--model", tmp_path / "nope", "--quiet"),
                       "neither a local folder nor a model id")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{ not json")
    assert_clean_error(cli("quantize", "--method", "rtn", "--model", broken, "--quiet"), "holds no loadable model")


def test_nan_weights_and_too_long_windows_fail_right_after_loading(tmp_path):
    bad = save_tiny_model(tmp_path / "nan", nan=True)
    assert_clean_error(cli("quantize", "--method", "gptq", "--model", bad, *TINY),
                       "model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf")
    assert_clean_error(cli("quantize", "--method", "rtn", "--model", bad.parent / "nan", "--seq-len", "100000",
                           "--quiet"), "NaN/Inf")  # weights are checked first
    good = save_tiny_model(tmp_path / "good")
    assert_clean_error(cli("quantize", "--method", "rtn", "--model", good, "--seq-len", "100000", "--quiet"),
                       "longer than the model's context (2048 tokens)")


def test_a_non_utf8_eval_file_is_named(tiny_model, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    proc = cli("quantize", "--method", "rtn", "--model", tiny_model, "--eval", latin, *TINY)
    assert_clean_error(proc, "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)")


def test_student_copies_never_replace_notebooks_without_overwrite(tmp_path):
    out = tmp_path / "student"
    first = cli("student", ROOT / "notebooks" / "01_uniform_quantization.ipynb", "--out", out)
    assert first.returncode == 0, first.stderr
    mine = out / "01_uniform_quantization.ipynb"
    mine.write_text("my answers")
    assert_clean_error(cli("student", ROOT / "notebooks" / "01_uniform_quantization.ipynb", "--out", out),
                       "already exists; pass --overwrite")
    assert mine.read_text() == "my answers"
    again = cli("student", ROOT / "notebooks" / "01_uniform_quantization.ipynb", "--out", out, "--overwrite")
    assert again.returncode == 0 and mine.read_text() != "my answers"


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("quantize", "--method", "rtn", "--model", tmp_path / "nope", "--quiet", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ------------------------------------------------------------------ verified score caches

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def run_tacq(config):
    model = tiny_llama()
    result = tacq.tacq_quantize(model, WINDOWS, config, progress=False)
    return result.masks, result.info


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    config = QuantConfig(method="tacq", ratio=0.01, n_calib=4, seq_len=32, cache_dir=str(tmp_path_factory.mktemp("c")))
    masks, _ = run_tacq(config)
    return config, masks


def rewrite(path: Path, change, *, checksum: bool) -> None:
    """Change the tensors of a cache file in place, keeping its key (and, if asked, a valid checksum)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    change(tensors)
    if checksum:
        meta[score_cache.CHECKSUM_FIELD] = score_cache.cache_checksum(tensors, meta[score_cache.KEY_FIELD])
    save_file(tensors, str(path), metadata=meta)


def huge(tensors):  # 50 entries of one linear's G overwritten with huge values
    name = next(n for n in tensors if n.startswith("G/"))
    tensors[name].view(-1)[:50] = 1e30


def one_nan(tensors):
    name = next(n for n in tensors if n.startswith("G/"))
    tensors[name].view(-1)[7] = float("nan")


def wrong_shape(tensors):
    name = next(n for n in tensors if n.startswith("G/"))
    tensors[name] = tensors[name][:, :-1].contiguous()


@pytest.mark.parametrize("change, checksum, phrase", [
    (huge, False, "does not match the checksum"),
    (one_nan, False, "does not match the checksum"),
    (one_nan, True, "NaN/Inf"),
    (wrong_shape, True, "the model needs"),
])
def test_a_damaged_cache_is_named_discarded_and_recomputed(clean, tmp_path, change, checksum, phrase):
    config, want = clean
    shutil.copytree(config.cache_dir, tmp_path / "c")
    config = config.replace(cache_dir=str(tmp_path / "c"))
    (gfile,) = (tmp_path / "c").glob("gradients-*.safetensors")
    rewrite(gfile, change, checksum=checksum)
    with pytest.warns(score_cache.CacheWarning, match=f"score cache {gfile} is damaged .*{phrase}"):
        masks, info = run_tacq(config)
    assert info["gradients"] == "computed" and info["qw"] == "cache"
    assert all(torch.equal(masks[n], want[n]) for n in want)
    masks, info = run_tacq(config)  # the rewrite replaced the damaged file
    assert info["gradients"] == "cache" and all(torch.equal(masks[n], want[n]) for n in want)


def test_a_cache_that_cannot_be_written_warns_and_the_run_goes_on(clean, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*_a, **_kw):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    def full_disk_stream(*_a, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # Q(W) − W's spill files: kept in memory
    monkeypatch.setattr(score_cache, "write_safetensors", full_disk_stream)  # the cache files
    config, want = clean
    with pytest.warns(score_cache.CacheWarning, match="could not write .*No space left"):
        masks, info = run_tacq(config.replace(cache_dir=str(tmp_path)))
    assert all(torch.equal(masks[n], want[n]) for n in want)
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_the_qw_key_holds_the_thread_count_of_its_pass(clean, tmp_path):
    """GPTQ's rounding depends on the thread count, so Q(W) made on 1 and on 2 threads must not share a key."""
    config = clean[0].replace(cache_dir=str(tmp_path), parallel=False)
    files = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            run_tacq(config)
        finally:
            torch.set_num_threads(1)
        files.append({p.name for p in tmp_path.glob("qw-*.safetensors")})
    assert len(files[0]) == 1 and len(files[1]) == 2


# ------------------------------------------------------------------ the same command, the same model


def test_the_same_command_gives_a_bit_identical_model(tiny_model, tmp_path):
    """Two threads and the forked gradient worker, twice from an empty cache, once from the cache."""
    shas = []
    for run, cache in (("a", "ca"), ("b", "cb"), ("c", "ca")):
        proc = cli("quantize", "--method", "tacq", "--model", tiny_model, "--ratio", "0.01", "--save", tmp_path / run,
                   "--cache-dir", tmp_path / cache, *TINY, env={"OMP_NUM_THREADS": "2"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        shas.append(sha256(tmp_path / run / TENSOR_FILE))
    assert shas[0] == shas[1] == shas[2]


# ------------------------------------------------------------------ no orphaned gradient worker

WORKER_SCRIPT = """
import sys, time, torch
from tacq_lite.run.parallel import GradientWorker
from tacq_lite.model.loading import tiny_llama
torch.set_num_threads(2)
model = tiny_llama(hidden=128, intermediate=256)
samples = torch.randint(0, 256, (100000, 64))  # far more than the test waits for
job = GradientWorker(model, samples)
print(job._process.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has stopped running; its parent (pid 1) reaps it


def wait_gone(pid: int, seconds: float = 30) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker is Linux-only (fork)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_the_gradient_worker_dies_with_its_parent(sig):
    parent = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
    child = int(parent.stdout.readline())
    try:
        end = time.monotonic() + 30  # the worker names itself as it starts
        while Path(f"/proc/{child}/comm").read_text().strip() != "tacq_lite-grad" and time.monotonic() < end:
            time.sleep(0.1)
        assert alive(child) and Path(f"/proc/{child}/comm").read_text().strip() == "tacq_lite-grad"
        parent.send_signal(sig)
        parent.wait(timeout=60)
        assert wait_gone(child), f"worker {child} outlived its parent"
    finally:
        parent.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker is Linux-only (fork)")
def test_timeout_of_a_cli_run_leaves_no_worker(tmp_path):
    """`timeout` sends SIGTERM: the CLI run goes, and its worker with it."""
    model = save_tiny_model(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "tacq_lite.cli", "quantize", "--method", "tacq", "--model",
                             str(model), "--n-calib", "4096", "--seq-len", "128", "--no-mse", "--quiet",
                             "--cache-dir", str(tmp_path / "c")],
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        child = None
        end = time.monotonic() + 300
        while child is None and time.monotonic() < end and proc.poll() is None:
            for p in Path("/proc").glob("[0-9]*"):
                try:
                    stat = (p / "stat").read_text()
                except OSError:
                    continue
                if "(tacq_lite-grad)" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                    child = int(p.name)
            time.sleep(0.2)
        assert child is not None, "the gradient worker never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert wait_gone(child), f"worker {child} outlived the CLI run"
    finally:
        proc.kill()
