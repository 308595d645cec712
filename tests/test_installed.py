"""An installed spvr_lib (a wheel in a virtual environment, run from elsewhere) keeps its run cache in
$SPVR_CACHE or the user's cache directory, never under site-packages; a checkout keeps it in its data/."""
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from spvr_lib import store

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_keeps_its_cache_in_its_data_folder():
    if os.environ.get("SPVR_ROOT") or os.environ.get("SPVR_CACHE"):
        pytest.skip("SPVR_ROOT / SPVR_CACHE set")
    assert store.REPO_ROOT == REPO and store.cache_dir() == REPO / "data" / "runs"


@pytest.mark.slow
def test_an_installed_copy_keeps_its_cache_out_of_site_packages(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    # the wheel goes into the new environment; its dependencies (torch, ...) are read from this one's
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(next(wheels.glob("spvr_lib-*.whl")))], check=True, capture_output=True)
    (target / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    probe = ("import json, spvr_lib; from spvr_lib import store, train; "
             "store.cached({'x': 1}, lambda: {'v': 1}, kind='t'); "
             "print(json.dumps({'pkg': spvr_lib.__file__, 'runs': str(store.cache_dir()), "
             "'checkpoints': str(train.checkpoint_dir())}))")
    env = {k: v for k, v in os.environ.items() if k not in ("SPVR_ROOT", "SPVR_CACHE", "PYTHONPATH")}
    env["HOME"], env["XDG_CACHE_HOME"] = str(tmp_path / "home"), str(tmp_path / "xdg")
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = json.loads(subprocess.run([str(py), "-c", probe], cwd=work, env=env, check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert Path(out["pkg"]).is_relative_to(target)                       # the installed copy, not the checkout
    assert out["runs"] == str(tmp_path / "xdg" / "spvr_lib" / "data" / "runs")
    assert out["checkpoints"] == str(tmp_path / "xdg" / "spvr_lib" / "data" / "checkpoints")
    assert len(list((tmp_path / "xdg" / "spvr_lib" / "data" / "runs").glob("t-*.json"))) == 1
    assert not list(target.rglob("t-*.json")) and not (target / "data").exists()
    # without XDG_CACHE_HOME: ~/.cache; with SPVR_CACHE: there
    del env["XDG_CACHE_HOME"]
    out = json.loads(subprocess.run([str(py), "-c", probe], cwd=work, env=env, check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert out["runs"] == str(tmp_path / "home" / ".cache" / "spvr_lib" / "data" / "runs")
    env["SPVR_CACHE"] = str(tmp_path / "mine")
    out = json.loads(subprocess.run([str(py), "-c", probe], cwd=work, env=env, check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert out["runs"] == str(tmp_path / "mine") and list((tmp_path / "mine").glob("t-*.json"))
