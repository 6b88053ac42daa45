"""What `pip install` gives, and what the model files need: the wheel holds the one module
ConvRNN under the MIT license with torch as its only dependency; model.py, encoder.py,
decoder.py and net_params.py import no plotting, metrics or logging library."""

import email.parser
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("PIL", "skimage", "tensorboard", "tqdm")  # what training and evaluation pull in
MODEL_FILES = "import model, encoder, decoder, net_params"


def python(code: str, cwd=REPO, **env) -> list[str]:
    """The lines `python -c code` prints, run in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_the_model_files_load_no_plotting_or_metrics_library():
    # torch itself imports tqdm where it is installed (torch.hub's progress bar), so what
    # counts is what the model files add to what torch loaded.
    added, anywhere = python(f"""
import sys
import torch
before = set(sys.modules)
{MODEL_FILES}
print(sorted({{m.split(".")[0] for m in set(sys.modules) - before}}))
print(sorted(m for m in {HEAVY[:3]!r} if m in sys.modules))
""")
    assert "'model'" in added and "'net_params'" in added  # the imports did happen
    assert not [name for name in HEAVY if repr(name) in added], added
    assert anywhere == "[]"


def test_the_model_files_build_and_run_without_those_libraries():
    """With PIL, skimage, tensorboard and tqdm made unimportable, a model still builds and
    predicts: none of them is needed, not even lazily."""
    lines = python(f"""
import sys
for name in {HEAVY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import torch
{MODEL_FILES}
pred = model.build_model("tiny")(torch.rand(1, 2, 1, 64, 64), frames_output=3)
print(tuple(pred.shape))
""")
    assert lines == ["(1, 3, 1, 64, 64)"]


def _can_build_a_wheel_offline() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.slow  # pip builds and installs a wheel
@pytest.mark.skipif(not _can_build_a_wheel_offline(),
                    reason="this Python's setuptools can't build a wheel without build isolation")
def test_the_wheel_is_ConvRNN_alone_under_MIT_needing_only_torch(tmp_path):
    # A copy of the repo, so that the build's build/ and egg-info stay out of the checkout;
    # every other top-level module is in it, and must stay out of the wheel.
    source = tmp_path / "repo"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "mnist"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels = tmp_path / "wheels"
    done = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           str(source), "-w", str(wheels)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [wheel] = wheels.glob("convrnn-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"ConvRNN.py"}
    meta_path = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(meta_path).decode())
    assert meta["Name"] == "convrnn"
    assert "MIT" in (meta.get("License-Expression"), meta.get("License"))
    assert meta.get_all("Requires-Dist") == ["torch"]
    assert "LICENSE" in meta.get_all("License-File")
    license_path = next(n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n)
    assert zipfile.ZipFile(wheel).read(license_path).decode().startswith("MIT License")

    # Installed on its own and imported from another folder: ConvRNN, and nothing generic.
    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--no-compile",
                           "--target", str(site), str(wheel)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    installed = {p.name for p in site.iterdir()}
    assert installed - {n for n in installed if n.endswith(".dist-info")} == {"ConvRNN.py"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = python("import ConvRNN; from ConvRNN import ConvLSTMCell, run_cell; "
                   "print(ConvRNN.__file__)", cwd=elsewhere, PYTHONPATH=str(site))
    assert where == [str(site / "ConvRNN.py")]
