"""The reproduction check of RESULTS.md (pipelines.results compare), on hand-written tables."""

import json

from pipelines import results

REFERENCE = """# Results

## Training

| model | acc | Gini |
|---|---|---|
| erm | 0.500 ± 0.100 | 0.400 ± 0.010 |
| scaat | 0.600 ± 0.050 | 0.550 |

## The claims, one line each

- **002** (SCAAT ...) Saliency Gini +0.134 → supported; accuracy +0.072 → within seed-to-seed noise: inconclusive.
"""

RERUN = """# Results

## Training

| model | acc | Gini |
|---|---|---|
| erm | 0.580 ± 0.120 | 0.440 ± 0.020 |
| scaat | 0.900 ± 0.050 | 0.990 |

## The claims, one line each

- **002** (SCAAT ...) Saliency Gini +0.100 → supported; accuracy +0.300 → supported.
"""


def test_mean_std_cells_keys_and_values():
    cells = results.mean_std_cells(REFERENCE)
    # single values (no std) are not compared
    assert cells == {("Training", "erm", "acc"): (0.5, 0.1), ("Training", "erm", "Gini"): (0.4, 0.01),
                     ("Training", "scaat", "acc"): (0.6, 0.05)}


def test_compare_classifies_each_cell_and_the_verdicts():
    res = results.compare_results(REFERENCE, RERUN)
    by = {(r["row"], r["column"]): r for r in res["cells"]}
    # erm acc: |0.08| <= 0.1 (reference std)
    assert by[("erm", "acc")]["within_reference_std"] and by[("erm", "acc")]["within_sum_of_stds"]
    # erm Gini: |0.04| > 0.01 (reference std) and > 0.01 + 0.02 + 1e-3 (sum of both stds)
    assert not by[("erm", "Gini")]["within_reference_std"] and not by[("erm", "Gini")]["within_sum_of_stds"]
    # scaat acc: |0.3| far beyond
    assert abs(by[("scaat", "acc")]["diff"] - 0.3) < 1e-12 and not by[("scaat", "acc")]["within_sum_of_stds"]
    assert (res["within_reference_std"], res["within_sum_of_stds"]) == (1, 1)
    v = res["verdicts"]["002"]
    assert v["reference"] == ["supported", "within seed-to-seed noise: inconclusive"]
    assert v["rerun"] == ["supported", "supported"] and not v["same"]


def test_cli_exit_status_and_json(tmp_path, capsys):
    ref, rerun = tmp_path / "ref.md", tmp_path / "rerun.md"
    ref.write_text(REFERENCE, encoding="utf-8")
    rerun.write_text(RERUN, encoding="utf-8")
    assert results.main([str(ref), str(ref)]) == 0
    out = tmp_path / "cmp.json"
    assert results.main([str(ref), str(rerun), "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "3 mean ± std cells in both: 1 within the reference's std" in text and "DIFFERENT verdicts" in text
    assert len(json.loads(out.read_text())["cells"]) == 3


def test_cli_names_a_missing_file(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="cannot read .*nope.md"):
        results.main([str(tmp_path / "nope.md"), str(tmp_path / "nope.md")])
