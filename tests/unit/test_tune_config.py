"""The training-knob sweep's config (section tune), its settings applied to the config, and a trial's store."""

import pytest

from pipelines import storage as st
from pipelines.config import ROOT, ConfigError, load_config, with_knobs

SMOKE = ROOT / "configs/smoke.yaml"
SPACE = "tune.spaces={consistency: {consistency.power: [1, 2]}}"


@pytest.mark.parametrize("overrides,match", [
    (["tune.spaces={bogus: {train.lr: [1]}}"], r"unknown mode 'bogus'"),
    (["tune.spaces={consistency: {scaat.keep: [0.3]}}"], r"knob 'scaat.keep' must be a key of section consistency"),
    (["tune.spaces={jtt: {lambda_up: [2]}}"], r"knob 'lambda_up' must be a key of section jtt or train"),
    (["tune.spaces={consistency: {consistency.power: []}}"], r"consistency.power: expected a non-empty list"),
    (["train.modes=[erm, scaat, adv_whole]",
      "tune.spaces={scaat: {scaat.keep: [0.3]}, adv_whole: {scaat.keep: [0.6]}}"],
     r"'scaat.keep' is swept for both 'scaat' and 'adv_whole'"),
    (["train.seeds=[0, 100]", SPACE], r"tune.seeds \[100, 101\] and train.seeds \[0, 100\] share \[100\]"),
    (["train.modes=[erm, scaat]", SPACE],
     r"tune.spaces sweeps \['consistency'\], which train.modes=\['erm', 'scaat'\]"),
    (["tune.seeds=[3, 3]"], r"tune.seeds \[3, 3\]: expected distinct seeds"),
    (["sweep.train_mode=scaat"], r"moved to the tune section"),
    (["sweep.train_trials=8"], r"moved to the tune section"),
])
def test_bad_tune_settings_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SMOKE, overrides)


def test_knobs_set_dotted_keys_and_are_validated_again():
    cfg = load_config(SMOKE, [SPACE])
    tuned = with_knobs(cfg, {"consistency.power": 2.0, "consistency.lr": 0.01, "train.lr": 0.5})
    assert (tuned.consistency.power, tuned.consistency.lr, tuned.train.lr) == (2.0, 0.01, 0.5)
    assert cfg.consistency.power == 1.0 and cfg.train.lr == 1e-3  # the original is untouched
    with pytest.raises(ConfigError, match=r"knob 'consistency.bogus': no such config key"):
        with_knobs(cfg, {"consistency.bogus": 1})
    with pytest.raises(ConfigError, match=r"consistency\.power: .*greater than 0"):
        with_knobs(cfg, {"consistency.power": -1})


def test_a_tuned_setting_changes_only_the_swept_modes_model_keys():
    from pipelines import sweep
    from pipelines.common import model_hash

    cfg = load_config(SMOKE, [SPACE, "train.modes=[erm, consistency, scaat, adv_whole]"])
    same = sweep.tuned_config(cfg, {"consistency": {"consistency.power": 1.0}})  # the config's own value
    other = sweep.tuned_config(cfg, {"consistency": {"consistency.power": 2.0}, "scaat": {"scaat.keep": 0.3}})
    for mode in ("erm", "consistency", "scaat", "adv_whole"):
        assert model_hash(same, mode, 0) == model_hash(cfg, mode, 0)
    assert [model_hash(other, m, 0) == model_hash(cfg, m, 0) for m in ("erm", "consistency", "scaat", "adv_whole")] \
        == [True, False, False, False]  # adv_whole reads SCAAT's section: it takes SCAAT's chosen keep
    assert other.scaat.keep == 0.3 and sweep.merged_knobs({"a": {"x.y": 1}, "b": {"z.w": 2}}) == {"x.y": 1, "z.w": 2}


def test_labels_and_trial_folders():
    from pipelines import sweep

    assert sweep.knob_label({"b.y": 0.5, "a.x": None}) == "a.x=None,b.y=0.5"
    assert sweep.trial_scope("jtt", {"jtt.lambda_up": 6.0, "train.lr": "1e-3/2"}) == \
        "tune/jtt/trials/jtt.lambda_up=6.0,train.lr=1e-3_2"


def test_the_knob_sweep_keys_stay_out_of_the_stage_keys_until_a_setting_is_chosen():
    from pipelines import evaluate, sweep, train

    cfg, tuned = load_config(SMOKE), load_config(SMOKE, [SPACE, "tune.seeds=[7, 8]", "tune.metric=val_acc"])
    assert train.config_hash(tuned) == train.config_hash(cfg)
    assert sweep.config_hash(tuned) == sweep.config_hash(cfg)
    alphas = {"tif": 0.1, "gradcam_thresholded": 0.0}
    assert evaluate.config_hash(tuned, alphas) == evaluate.config_hash(cfg, alphas)
    # the mode's unit key follows its space, seeds and metric
    assert sweep.knobs_hash(tuned, "consistency") != sweep.knobs_hash(load_config(SMOKE, [SPACE]), "consistency")


def test_a_scoped_store_writes_under_its_folder_and_reads_the_shared_ones(tmp_path):
    root = st.Storage(str(tmp_path))
    root.write_bytes(b"rows", "ingest", "train", "part-0.parquet")
    trial = root.scoped("tune/consistency/trials/t1", shared=("ingest", "warmups"))
    assert trial.read_bytes("ingest/train/part-0.parquet") == b"rows"
    trial.write_bytes(b"model", "train", "erm_s0", "model.pt")
    trial.write_bytes(b"warm", "warmups/erm_s0.pt")
    assert (tmp_path / "tune/consistency/trials/t1/train/erm_s0/model.pt").read_bytes() == b"model"
    assert (tmp_path / "warmups/erm_s0.pt").read_bytes() == b"warm"
    assert not (tmp_path / "train").exists()
    assert trial.uri("train") == str(tmp_path / "tune/consistency/trials/t1/train")
    again = st.Storage(*trial.args())  # what a Ray worker rebuilds it from
    assert again.path("precompute", "x") == trial.path("precompute", "x")
    assert again.path("ingest") == root.path("ingest")
    nested = trial.scoped("inner")
    assert nested.path("a") == str(tmp_path / "tune/consistency/trials/t1/inner/a")
    assert trial.list_files("train") == [str(tmp_path / "tune/consistency/trials/t1/train/erm_s0/model.pt")]


def test_validation_scores_by_hand():
    """A model that predicts class 0 everywhere: accuracy = the share of class-0 images, conflicting accuracy
    = the share of class-0 images among the conflicting ones, worst group 0 (a group of another class)."""
    import torch

    from pipelines import sweep

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)

    cfg = load_config(SMOKE, ["data.num_classes=2", "train.val_min_group=2"])
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    backgrounds = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0])  # the last four are conflicting
    val = {"image": torch.zeros(8, 3, 4, 4), "label": labels, "background": backgrounds,
           "group": (labels != backgrounds).long()}
    got = sweep.validation_scores(cfg, Zero(), val)
    assert got == {"val_acc": 0.5, "val_conflicting_acc": 0.5, "val_worst_group_acc": 0.0}
