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


def test_readme_tune_section_is_a_valid_config():
    """The README's `tune` example, set on the paper config (whose modes it must train), validates."""
    import yaml

    from pipelines.config import ROOT, load_config, with_knobs

    m = re.search(r"<!-- example: tune .*?-->\s*```yaml\n(.*?)```", README.read_text(), re.S)
    assert m, "README.md has no block marked '<!-- example: tune ...-->'"
    tune = yaml.safe_load(m.group(1))["tune"]
    cfg = load_config(ROOT / "configs/paper.yaml", ["train.modes=[erm, consistency, jtt, scaat, adv_whole]",
                                                    f"tune={tune}"])
    assert set(cfg.tune.spaces) == {"consistency", "jtt", "scaat"} and cfg.tune.seeds == [100, 101]
    from pipelines.sweep import tune_metric

    assert (tune_metric(cfg, "scaat"), tune_metric(cfg, "jtt")) == ("val_saliency_gini", "val_conflicting_acc")
    first = {k: v[0] for space in cfg.tune.spaces.values() for k, v in space.items()}
    assert with_knobs(cfg, first).jtt.lambda_up == 4
