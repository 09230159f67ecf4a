"""Config loading and validation happen before Ray starts: errors name the key and what is allowed."""

from pathlib import Path

import pytest

from pipelines.config import ROOT, ConfigError, load_config


@pytest.mark.parametrize("name", ["smoke", "quick", "paper"])
def test_shipped_configs_validate(name):
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    cfg = load_config(path)
    assert cfg.name == name


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(ROOT / "configs/smoke.yaml", ["train.epochs=3", "sweep.alphas=[0.1, 0.2]",
                                                     "tracking.uri=sqlite:///x.db", "train.device=cpu"])
    assert cfg.train.epochs == 3 and cfg.sweep.alphas == [0.1, 0.2]
    assert cfg.tracking.uri == "sqlite:///x.db" and cfg.train.device == "cpu"


@pytest.mark.parametrize("override,match", [
    ("train.epochz=3", r"train\.epochz: unknown key; allowed keys here: modes, loss, seeds, epochs"),
    ("bogus.x=1", r"bogus: unknown key"),
    ("train.epochs=abc", r"train\.epochs: .*integer.*'abc'"),
    ("train.epochs=0", r"train\.epochs: .*greater than or equal to 1"),
    ("consistency.similarity=foo", r"consistency\.similarity: .*'cosine', 'pearson' or 'js'.*'foo'"),
    ("sweep.alphas=[0.5, 1.5]", r"alphas \[1\.5\] out of range"),
    ("evaluate.methods=[gradcam, nope]", r"unknown method\(s\) \['nope'\]"),
    ("train.modes=[consistency]", r"'erm' must be in train.modes"),
    ("model.arch=resnet_99", r"model\.arch: .*unknown architecture 'resnet_99'; allowed: small_resnet, vit_tiny, "),
    ("data.multilabel=true", r"needs data.multilabel=true, data.source=biased_shapes or voc and train.loss=bce"),
    ("train.loss=bce", r"got multilabel=False, source='biased_shapes', loss='bce'"),
    ("model.arch=vit_h_14", r"'vit_h_14' has patch size 14: data.size=32 must be a multiple of it"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/smoke.yaml", [override])


def test_multilabel_trains_erm_only():
    with pytest.raises(ConfigError, match=r"train.modes=\['erm', 'consistency', 'scaat'\]: with multi-label data only "
                                          r"'erm' trains .*set train.modes=\[erm\]"):
        load_config(ROOT / "configs/smoke.yaml", ["data.multilabel=true", "train.loss=bce"])
    cfg = load_config(ROOT / "configs/smoke.yaml", ["data.multilabel=true", "train.loss=bce", "train.modes=[erm]"])
    assert cfg.data.multilabel and cfg.train.loss == "bce"


def test_rounds_must_fit_in_epochs():
    with pytest.raises(ConfigError, match=r"rounds=3 x consistency.round_epochs=1 .*train.epochs=2"):
        load_config(ROOT / "configs/smoke.yaml", ["consistency.rounds=3"])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"does not exist; shipped configs \(by name or path\): .*quick, smoke"):
        load_config(tmp_path / "nope.yaml")
    assert load_config("smoke").name == "smoke" and load_config("quick.yaml").name == "quick"  # by name
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(ROOT / "configs/smoke.yaml", ["train.epochs"])


def test_section_hash_tracks_only_its_sections():
    a = load_config(ROOT / "configs/smoke.yaml")
    b = load_config(ROOT / "configs/smoke.yaml", ["evaluate.haf_steps=7"])
    assert a.section_hash("data", "train") == b.section_hash("data", "train")
    assert a.section_hash("evaluate") != b.section_hash("evaluate")


def test_only_and_until_exclude_each_other(capsys):
    from pipelines.full import parse_args

    assert parse_args(["--until", "train"]).until == "train"
    with pytest.raises(SystemExit) as e:
        parse_args(["--only", "sweep", "--until", "evaluate"])
    assert e.value.code == 2 and "--only and --until exclude each other" in capsys.readouterr().err


def test_the_sweep_hash_ignores_evaluate_keys_no_trial_reads():
    from pipelines import sweep

    base = load_config(ROOT / "configs/smoke.yaml")
    same = load_config(ROOT / "configs/smoke.yaml", ["evaluate.shard_images=7", "evaluate.n_test=9",
                                                     "evaluate.figure_images=1", "evaluate.pgd_steps=1"])
    assert sweep.config_hash(same) == sweep.config_hash(base)
    for o in ("evaluate.deletion_steps=5", "evaluate.tif_base=gradient", "evaluate.methods=[gradcam, tif]",
              "sweep.n_val=8", "train.epochs=3"):
        assert sweep.config_hash(load_config(ROOT / "configs/smoke.yaml", [o])) != sweep.config_hash(base), o
    assert set(sweep.NOT_SWEPT) <= set(base.evaluate.model_dump())  # no stale names


def test_keys_added_later_leave_the_hashes_of_older_runs_alone():
    """A committed stage stays valid when the config learns a new key: at its default the key is not hashed."""
    from pipelines.common import model_hash
    from pipelines.config import LATER_DEFAULTS, digest

    cfg = load_config(ROOT / "configs/smoke.yaml")
    older = {s: {k: v for k, v in getattr(cfg, s).model_dump(mode="json").items() if k not in LATER_DEFAULTS.get(s, {})}
             for s in ("data", "train")}
    assert cfg.section_hash("data", "train") == digest(older)
    ml = load_config(ROOT / "configs/smoke.yaml", ["data.multilabel=true", "train.loss=bce", "train.modes=[erm]"])
    assert ml.section_hash("data") != cfg.section_hash("data")
    assert model_hash(ml, "erm", 0) != model_hash(cfg, "erm", 0)


def test_dataset_sources_take_their_classes_from_the_data(tmp_path: Path):
    from tests._datasets import write_cub, write_voc

    cub = write_cub(tmp_path)
    cfg = load_config(ROOT / "configs/smoke.yaml", ["data.source=cub", f"data.root={cub}"])
    assert cfg.data.num_classes == 3  # classes.txt ids 1, 5, 9: no cap of 6, no gaps
    import shutil

    from pipelines.config import Config

    dumped = cfg.model_dump(mode="json")
    shutil.rmtree(cub)  # what a Ray worker does with the config: no read of data.root (not on its node)
    assert Config.model_validate(dumped).data.num_classes == 3
    cub = write_cub(tmp_path)
    with pytest.raises(ConfigError, match=r"data.num_classes=200 but cub under .* has 3 classes"):
        load_config(ROOT / "configs/smoke.yaml", ["data.source=cub", f"data.root={cub}", "data.num_classes=200"])
    with pytest.raises(ConfigError, match=r"data.root must name the waterbirds dataset's folder"):
        load_config(ROOT / "configs/smoke.yaml", ["data.source=waterbirds"])
    with pytest.raises(ConfigError, match=r"Waterbirds metadata '.*/nowhere/metadata.csv' not found"):
        load_config(ROOT / "configs/smoke.yaml", ["data.source=waterbirds", f"data.root={tmp_path / 'nowhere'}"])
    voc = write_voc(tmp_path)
    with pytest.raises(ConfigError, match=r"data.source=voc is multi-label: set data.multilabel=true"):
        load_config(ROOT / "configs/smoke.yaml", ["data.source=voc", f"data.root={voc}"])
    ok = load_config(ROOT / "configs/smoke.yaml", ["data.source=voc", f"data.root={voc}", "data.multilabel=true",
                                                   "train.loss=bce", "train.modes=[erm]"])
    assert ok.data.num_classes == 20
    with pytest.raises(ConfigError, match=r"data.num_classes=7: biased_shapes draws at most 6 shapes"):
        load_config(ROOT / "configs/smoke.yaml", ["data.num_classes=7"])


@pytest.mark.parametrize("name", ["cub", "waterbirds", "voc"])
def test_dataset_configs_validate_with_a_root_and_name_it_without(name, tmp_path: Path):
    from tests import _datasets

    with pytest.raises(ConfigError, match=rf"data.root must name the {name} dataset's folder"):
        load_config(ROOT / "configs" / f"{name}.yaml")
    root = getattr(_datasets, f"write_{name}")(tmp_path)
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.root={root}"])
    assert cfg.data.num_classes == {"cub": 3, "waterbirds": 2, "voc": 20}[name]
    assert cfg.model.arch == "resnet50" and cfg.model.weights == "IMAGENET1K_V2" and cfg.data.size == 224
