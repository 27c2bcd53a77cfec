"""The distribution installs the import package model_supervisor, never a top-level `supervisor`: that is
supervisord's import name, and two distributions that install one package break each other silently.

Run from / so the checkout's own folder is not on sys.path: this is what an installed environment sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent

PROBE = """
import importlib.metadata, importlib.util, json
import model_supervisor, supervisor
spec = importlib.util.find_spec("supervisor.supervisord")
dist = importlib.metadata.distribution("model-supervisor")
tops = sorted({p.parts[0] for p in (dist.files or []) if p.suffix == ".py" and len(p.parts) > 1})
print(json.dumps({"ours": model_supervisor.__file__, "supervisord": spec.origin if spec else None, "tops": tops}))
"""


def test_model_supervisor_and_supervisord_are_both_importable_side_by_side():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd="/", capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert found["ours"].endswith(os.path.join("supervisor", "__init__.py"))  # our folder, under its new name
    assert found["supervisord"] is not None and "site-packages" in found["supervisord"]
    assert "supervisor" not in found["tops"]


def test_both_command_lines_work():
    ours = subprocess.run([BIN / "model-supervisor", "--help"], cwd="/", capture_output=True, text=True)
    assert ours.returncode == 0 and "model-supervisor" in ours.stdout
    theirs = subprocess.run([BIN / "supervisord", "--version"], cwd="/", capture_output=True, text=True)
    assert theirs.returncode == 0 and theirs.stdout.strip()[0].isdigit()


def test_python_dash_m_entry_points_use_the_new_name():
    out = subprocess.run([sys.executable, "-m", "model_supervisor.cli", "--help"], cwd="/", capture_output=True,
                         text=True)
    assert out.returncode == 0
