"""notebooks/analysis.ipynb executes top to bottom against a run made on the simulator."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, run_cli

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_against_a_simulated_run(tmp_path, monkeypatch):
    proc = run_cli("harness.loop", "--run-dir", "runs/tiny", "--set", "task.n_test=15", "--set", "task.n_train=30",
                   "--set", "finetune.iterations=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The kernel inherits this environment: the notebook reads its run directories from it.
    monkeypatch.setenv("HARNESS_RUN_DIRS", str(tmp_path / "runs" / "*"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # accuracy, diversity, per-agent, usage
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1 run(s)" in text
