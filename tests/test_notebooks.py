"""Execute every notebook in colab/ top to bottom and check that it draws something.

Each notebook runs in a fresh ``python3`` Jupyter kernel with the repository root as
working directory and on ``PYTHONPATH``, on the CPU (``JAX_PLATFORMS=cpu``) with the
Agg matplotlib backend. A cell that raises fails the test with that cell's traceback.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient.exceptions import CellExecutionError  # noqa: E402
from jupyter_client.kernelspec import NoSuchKernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# A cell may train for a few minutes; on a slow shared 2-core machine the 400-step Multi30k cell of
# notebook 03 took over 300 s while another test ran beside it.
CELL_TIMEOUT_S = 900


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    # The notebooks' arrays are tiny, so their run time is XLA compile time: skipping LLVM's
    # optimisation passes cuts it by about a third on a CPU without changing any result.
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
    return env


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'colab'}"


# The training notebooks (a minute or more each on 2 cores) run with the slow tests.
SLOW_NOTEBOOKS = ("02_training_the_copy_task.ipynb", "03_translation_attention.ipynb", "04_beyond_text.ipynb")


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
    )
    try:
        client.execute(env=_kernel_env())
    except NoSuchKernel as e:  # pragma: no cover - depends on the machine
        pytest.fail(f"no 'python3' Jupyter kernel ({e}); install one with `python -m ipykernel install --user`")
    except CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # drop the traceback's terminal colours
        pytest.fail(f"{path.name}: a cell raised\n{plain}", pytrace=False)

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), "not every code cell was executed"
    images = [
        o for c in code_cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} produced no image/png output"


def test_every_notebook_starts_with_the_one_tfm_source_cell():
    cells = [nbformat.read(p, as_version=4).cells[0] for p in NOTEBOOKS]
    assert all(c.cell_type == "code" and 'TFM_SOURCE = ""' in c.source for c in cells)
    assert len({c.source for c in cells}) == 1, "the notebooks' setup cells differ"
    for p in NOTEBOOKS:
        meta = nbformat.read(p, as_version=4).metadata
        assert meta.get("accelerator") == "TPU", f"{p.name} does not ask Colab for a TPU runtime"


def test_the_setup_cell_installs_tfm_from_tfm_source(tmp_path):
    """A fresh environment (a virtualenv that sees the machine's packages, but not tfm on a path):
    the first cell with TFM_SOURCE set to this checkout installs it, and tfm imports from there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    cell = nbformat.read(NOTEBOOKS[0], as_version=4).cells[0].source
    probe = cell + "\nprint(tfm.__file__)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TFM_SOURCE"] = str(ROOT)
    p = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"installing tfm from {ROOT}" in p.stdout
    assert Path(p.stdout.strip().splitlines()[-1]).resolve() == ROOT / "tfm" / "__init__.py"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=env, check=True).stdout.strip()  # fmt: skip
    dist = [n for n in os.listdir(site) if n.startswith("tfm_jax") and n.endswith(".dist-info")]
    assert site.startswith(str(venv)) and len(dist) == 1, os.listdir(site)
    direct = json.loads(Path(site, dist[0], "direct_url.json").read_text())
    assert direct == {"dir_info": {"editable": True}, "url": ROOT.as_uri()}  # installed from the checkout, editable
