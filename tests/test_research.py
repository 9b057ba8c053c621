"""docs/research.md's examples run as written (the research API is what the docs say it is)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "research.md"


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_research_example_runs_as_written(capsys):
    blocks = python_blocks(DOC.read_text())
    assert blocks, f"{DOC} has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"loss \d+\.\d+, \d+\.\d CoT tokens left", out) and re.search(r"exact match \d\.\d\d", out)
    # The claims of the page: the initial model and the copied one survive later donating steps.
    assert np.isfinite(np.asarray(namespace["logits"])).all()
    state = namespace["state"]
    for _ in range(2):
        state, _ = namespace["step"](state, namespace["batch"], namespace["plan"].n_remove)
    assert namespace["evaluator"](namespace["trained"]).n_examples == len(namespace["data"].valid)
