"""Execute every notebook in colab/ top to bottom and check that it draws something.

Each notebook runs in a fresh ``python3`` Jupyter kernel with the repository root as
working directory and on ``PYTHONPATH``, on the CPU (``JAX_PLATFORMS=cpu``) with the
Agg matplotlib backend. A cell that raises fails the test with that cell's traceback.
"""

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from nbclient.exceptions import CellExecutionError  # noqa: E402
from jupyter_client.kernelspec import NoSuchKernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
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
