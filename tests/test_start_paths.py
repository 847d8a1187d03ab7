"""Every way a user starts gtacore, each in a fresh process: `python train.py` and `torchrun train.py`
from the repository root, `python /path/to/train.py` from elsewhere, each `python -m gtacore...`
entry point from another folder, an installed wheel, and one process holding every gtacore module
beside transformers 5 and the Hub's `kernels` package (whose import name our top-level
`kernels/` once shadowed, and was shadowed by)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_fixtures import write_dataset, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("gtacore.evaluate", "gtacore.plot", "gtacore.memory", "gtacore.models.demo",
                "gtacore.models.convert_gguf", "gtacore.models.tiny")


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    # PYTHONPATH is dropped so that nothing but the start itself decides where gtacore comes from.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(cmd, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} (in {cwd}) exited {res.returncode}:\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return write_tiny_checkpoint(folder / "model"), write_dataset(folder / "train.jsonl", 12)


def dry_run_flags(tiny, out: Path) -> list[str]:
    model, data = tiny
    return ["--model", str(model), "--data", str(data), "--dry-run", "--device", "cpu", "--output-dir", str(out)]


def test_train_py_from_the_root_and_from_another_folder(tiny, tmp_path):
    from_root = run([sys.executable, "train.py", *dry_run_flags(tiny, tmp_path / "a")], ROOT)
    elsewhere = run([sys.executable, str(ROOT / "train.py"), *dry_run_flags(tiny, tmp_path / "b")], tmp_path)
    for res in (from_root, elsewhere):
        assert "as the model receives them" in res.stdout


def test_torchrun_train_py_from_the_root(tiny, tmp_path):
    res = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "train.py", *dry_run_flags(tiny, tmp_path / "run")], ROOT, OMP_NUM_THREADS="1")
    assert res.stdout.count("as the model receives them") == 1  # rank 0 prints


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_from_another_folder(module, tmp_path):
    res = run([sys.executable, "-m", module, "--help"], tmp_path)
    assert res.stdout.startswith("usage:"), res.stdout[:500]


IMPORT_ALL = """
import importlib, pkgutil, sys
from pathlib import Path
import gtacore
names = [m.name for m in pkgutil.walk_packages(gtacore.__path__, "gtacore.")]
for name in names:
    importlib.import_module(name)
import kernels, transformers  # the Hub's kernels package, which transformers 5 uses
assert "site-packages" in kernels.__file__, kernels.__file__
assert hasattr(kernels, "get_kernel"), dir(kernels)
import gtacore.kernels
assert Path(gtacore.kernels.__file__).parent.parent == Path(gtacore.__file__).parent
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1])  # Hub kernels on by default in transformers 5
print(len(names), type(model).__name__)
"""


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_every_module_beside_transformers_and_the_hub_kernels(tiny, tmp_path, where):
    pytest.importorskip("kernels")
    res = run([sys.executable, "-c", IMPORT_ALL, str(tiny[0])], ROOT if where == "root" else tmp_path)
    count, name = res.stdout.split()
    assert int(count) >= 30 and name == "LlamaForCausalLM"


def test_wheel_installs_and_runs_from_another_folder(tiny, tmp_path):
    """A non-editable install: the wheel alone (gtacore, its kernels, models and bundled data)."""
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(ROOT)], tmp_path)
    wheel, = (tmp_path / "dist").glob("gtacore-*.whl")
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        tmp_path)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["gtacore"]
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "train.py", work)  # beside no checkout: gtacore can only come from the wheel
    where = run([sys.executable, "-c", "import gtacore; print(gtacore.__file__)"], work, PYTHONPATH=str(site))
    assert where.stdout.startswith(str(site)), where.stdout
    run([sys.executable, "-m", "gtacore.evaluate", "--help"], work, PYTHONPATH=str(site))
    model, _ = tiny
    res = run([sys.executable, "train.py", "--model", str(model), "--dry-run", "--device", "cpu"], work,
              PYTHONPATH=str(site))
    assert "emotion_train.jsonl (bundled" in res.stdout and "as the model receives them" in res.stdout
