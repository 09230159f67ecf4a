"""The README's examples run as written (each marked block, executed as it stands)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- example: {name} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked '<!-- example: {name} ...-->'"
    return m.group(1)


@pytest.mark.parametrize("name", ["vit", "multilabel"])
def test_readme_example_runs_as_written(name, capsys):
    torch.manual_seed(0)
    exec(compile(_block(name), f"README.md:{name}", "exec"), {})
    out = capsys.readouterr().out
    if name == "vit":
        assert out.split() == ["encoder.layers.encoder_layer_3.ln_1", "features.7", "torch.Size([1,", "224,",
                               "224])"]
    if name == "multilabel":
        assert out.split() == ["torch.Size([6,", "32,", "32])", "[0,", "0,", "1,", "2,", "2,", "2]", "[0,", "2,",
                               "3,", "1,", "2,", "3]"]
