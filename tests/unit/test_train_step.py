"""The per-worker training pieces without a cluster: losses checked by hand on a tiny batch."""

import math

import numpy as np
import pytest
import torch

from pipelines.common import resource_plan
from pipelines.config import ROOT, load_config
from pipelines.train import batch_loss, warmup_epochs


class Fixed(torch.nn.Module):
    """Returns preset logits per sample (plus 0 * a parameter, so a loss has a graph)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + 0 * self.p


def _cfg(*over):
    return load_config(ROOT / "configs/smoke.yaml", list(over))


def test_weighted_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = {"image": torch.zeros(3, 3, 4, 4), "label": torch.tensor([0, 0, 1]),
             "w": torch.tensor([0.5, 2.0, 0.5])}
    loss, out, extra = batch_loss(Fixed(logits), batch, "consistency", _cfg())
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    expected = (0.5 * ce[0] + 2.0 * ce[1] + 0.5 * ce[2]) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert extra["w_mean"] == pytest.approx(1.0)
    erm, _, _ = batch_loss(Fixed(logits), batch, "erm", _cfg())  # erm ignores the weights
    assert float(erm) == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_scaat_loss_with_lam_zero_is_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    loss, logits, extra = batch_loss(model, {"image": x, "label": y}, "scaat", _cfg("scaat.lam=0"))
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(model(x), y)), rel=1e-6)
    assert extra["eps_mean"] > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_warmup_epochs_and_resource_plan():
    cfg = _cfg("train.epochs=6", "consistency.rounds=3", "consistency.round_epochs=2")
    assert warmup_epochs(cfg) == 2
    plan = resource_plan(2, num_workers=2)  # RAY_NOTES: never take every CPU on a 2-CPU cluster
    assert plan.actors == 1 and plan.actors * plan.actor_cpus <= 1
    assert 2 * plan.train_worker_cpus <= 1
    assert plan.knob_concurrency == 1  # 2 x 0.5 CPU of workers + 0.25 of the trial: one trial fits in 1
    big = resource_plan(16, num_workers=4, actors=0)
    assert big.actors == 15 and big.train_worker_cpus == 1.0
    assert big.knob_concurrency == 3  # 15 spare // (4 x 1.0 + 0.25)
    assert resource_plan(4, num_workers=1).knob_concurrency == 2  # the test session's Ray: 3 // 1.25


class _FakeShard:
    """What ShardCache needs of a Ray Train dataset shard: iter_batches (here: fixed order, counted)."""

    def __init__(self, n: int, order: np.ndarray | None = None) -> None:
        idx = np.arange(n) if order is None else np.asarray(order)  # the order blocks arrive in
        self.rows = {"idx": idx, "image": np.stack([2 * idx, 2 * idx + 1], 1).astype(np.uint8)}
        self.streams = 0

    def iter_batches(self, batch_size, batch_format, local_shuffle_buffer_size, local_shuffle_seed):
        self.streams += 1
        n = len(self.rows["idx"])
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}


def test_shard_cache_streams_once_then_permutes_every_row_once_per_epoch():
    from pipelines.train import ShardCache

    shard, cache = _FakeShard(10), ShardCache(1 << 20)
    first = list(cache.epoch(shard, 4, seed=1))
    assert [len(b["idx"]) for b in first] == [4, 4, 2] and shard.streams == 1
    second = list(cache.epoch(shard, 4, seed=2))
    third = list(cache.epoch(shard, 4, seed=3))
    assert shard.streams == 1  # later epochs come from memory
    for epoch in (second, third):
        idx = np.concatenate([b["idx"] for b in epoch])
        assert sorted(idx.tolist()) == list(range(10))
        for b in epoch:  # rows stay whole: image row i is (2i, 2i+1)
            assert np.array_equal(b["image"][:, 0], 2 * b["idx"])
    assert [b["idx"].tolist() for b in second] != [b["idx"].tolist() for b in third]
    # The order of an epoch is the seed's permutation of the rows in idx order, whatever order Ray Data
    # delivered them in: a run resumed at epoch 2 (a fresh cache, rows arriving reversed) trains on the
    # same batches as the uninterrupted one.
    expect = np.random.default_rng(2).permutation(10)
    assert [b["idx"].tolist() for b in second] == [sorted(expect[i:i + 4].tolist()) for i in (0, 4, 8)]
    resumed = ShardCache(1 << 20)
    assert [b["idx"].tolist() for b in resumed.epoch(_FakeShard(10, order=np.arange(10)[::-1]), 4, seed=2)] \
        == [b["idx"].tolist() for b in second]
    assert [b["idx"].tolist() for b in first] == [
        sorted(np.random.default_rng(1).permutation(10)[i:i + 4].tolist()) for i in (0, 4, 8)]


def test_shard_cache_streams_every_epoch_when_the_shard_is_too_big():
    from pipelines.train import ShardCache

    shard, cache = _FakeShard(10), ShardCache(45)  # 10 rows x (8 + 2) bytes = 100 bytes > 45: found mid-pass
    for seed in range(3):
        rows = [i for b in cache.epoch(shard, 4, seed=seed) for i in b["idx"].tolist()]
        assert rows == list(range(10))  # every row once, in stream order, the first pass included
    assert shard.streams == 3 and cache.arrays is None and cache.too_big


def test_model_hash_retrains_only_what_a_change_touches():
    from pipelines.common import model_hash
    from pipelines.train import warmup_path

    base = _cfg()
    modes = ("erm", "consistency", "scaat")
    h = {m: model_hash(base, m, 0) for m in modes}
    assert len(set(h.values())) == 3 and model_hash(base, "erm", 1) != h["erm"]
    scaat = _cfg("scaat.lam=0.5")
    assert [model_hash(scaat, m, 0) == h[m] for m in modes] == [True, True, False]
    cons = _cfg("consistency.w_max=5")
    assert [model_hash(cons, m, 0) == h[m] for m in modes] == [True, False, True]
    # runtime settings and the list of seeds/modes do not retrain anything
    other = _cfg("train.seeds=[0,7]", "train.modes=[erm]", "train.max_failures=0", "train.cache_shard_mb=0")
    assert all(model_hash(other, m, 0) == h[m] for m in modes)
    lr = _cfg("train.lr=0.01")
    assert all(model_hash(lr, m, 0) != h[m] for m in modes)
    # the ERM warm-up checkpoint is named by its epoch and ERM config: a new schedule cannot pick up a stale one
    sched = _cfg("consistency.round_epochs=2", "train.epochs=6")
    assert warmup_path(base, 0) != warmup_path(sched, 0)
    assert warmup_path(base, 0).startswith(f"warmups/erm_s0_warmup_e{warmup_epochs(base)}_")


def test_progress_line_reaches_stdout_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train's worker print patch tees to a wrapped stdout and logs: the epoch line came out twice."""
    import builtins
    import io
    import sys

    from ray.train.v2._internal.logging.patch_print import _original_print, redirected_print

    from pipelines.common import progress

    raw, wrapped = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", raw)
    monkeypatch.setattr(sys, "stdout", wrapped)
    # Ray Train's local-mode runs earlier in the session patch this process's print too: start unpatched
    monkeypatch.setattr(builtins, "print", _original_print)
    progress("plain")  # builtin print: the current stdout
    assert (wrapped.getvalue(), raw.getvalue()) == ("plain\n", "")
    monkeypatch.setattr(builtins, "print", redirected_print)
    progress("[erm s0] epoch 1")
    assert raw.getvalue() == "[erm s0] epoch 1\n" and wrapped.getvalue() == "plain\n"


# ------------------------------------------------------------------ checkpoint selection (validation)
class _ByPixel(torch.nn.Module):
    """Predicts the class written in each image's first pixel (x 10), behind a BatchNorm whose running
    statistics must stay as they were (validation runs in eval mode)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.classes = classes

    def forward(self, x):
        self.bn(x)
        pred = (x[:, 0, 0, 0] * 10).round().long()
        return torch.nn.functional.one_hot(pred, self.classes).float()


def test_val_metrics_accuracy_and_worst_group_by_hand():
    from pipelines.train import val_metrics

    # 6 images: labels 0 0 0 1 1 1, backgrounds 0 0 0 1 1 0 (2 background families); predicted 0 0 1 1 1 0
    # groups (class, background): (0,0) = images 0-2, 2/3 right; (1,1) = images 3-4, 2/2; (1,0) = image 5, 0/1
    labels, bgs, pred = [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0]
    image = torch.zeros(6, 3, 4, 4)
    image[:, 0, 0, 0] = torch.tensor(pred, dtype=torch.float) / 10
    val = {"image": image, "label": torch.tensor(labels), "background": torch.tensor(bgs)}
    model = _ByPixel()
    before = model.bn.running_mean.clone()
    got = val_metrics(model, val, min_group=2, num_backgrounds=2, batch_size=4)  # two batches
    assert got["val_acc"] == pytest.approx(4 / 6)
    assert got["val_worst_group_acc"] == pytest.approx(2 / 3)  # (1,0) has 1 image < 2: left out
    assert val_metrics(model, val, min_group=1, num_backgrounds=2, batch_size=6)["val_worst_group_acc"] == 0.0
    assert math.isnan(val_metrics(model, val, min_group=4, num_backgrounds=2, batch_size=6)["val_worst_group_acc"])
    val["background"] = torch.full((6,), -1)  # no backgrounds (an image folder): class groups, 2/3 and 2/3
    assert val_metrics(model, val, min_group=3, num_backgrounds=2, batch_size=6)["val_worst_group_acc"] == \
        pytest.approx(2 / 3)
    assert model.training and torch.equal(model.bn.running_mean, before)


def test_select_checkpoints_last_and_earliest_best_validation_worst_group():
    from pipelines.train import select_checkpoints

    recs = [(3, {"val_worst_group_acc": 0.2}, b"e3"), (4, {"val_worst_group_acc": 0.5}, b"e4"),
            (5, {"val_worst_group_acc": 0.5}, b"e5"), (6, {"val_worst_group_acc": float("nan")}, b"e6"),
            (7, {"val_worst_group_acc": 0.1}, b"e7")]
    got = select_checkpoints(recs)
    assert got["last"][0] == 7 and got["last"][2] == b"e7"
    assert got["best_val_worst_group"][0] == 4 and got["best_val_worst_group"][2] == b"e4"  # tie: the earlier
    nan = [(1, {"val_worst_group_acc": float("nan")}, b"a"), (2, {}, b"b")]  # no group large enough
    assert select_checkpoints(nan)["best_val_worst_group"][0] == 2


def test_evaluated_checkpoints_follow_evaluate_checkpoint_and_name_what_is_missing():
    from pipelines.evaluate import evaluated_checkpoints

    manifest = {"files": {"erm_s0": "train/erm_s0/model.pt", "scaat_s0": "train/scaat_s0/model.pt"},
                "checkpoints": {"erm_s0": {"best_val_worst_group": {"epoch": 1, "path": "train/erm_s0/best.pt"}},
                                "scaat_s0": {"best_val_worst_group": {"epoch": 2, "path": "train/scaat_s0/model.pt"}}}}
    assert evaluated_checkpoints(_cfg(), manifest) == manifest["files"]
    best = _cfg("evaluate.checkpoint=best_val_worst_group")
    assert evaluated_checkpoints(best, manifest) == {"erm_s0": "train/erm_s0/best.pt",
                                                     "scaat_s0": "train/scaat_s0/model.pt"}
    del manifest["checkpoints"]["scaat_s0"]
    with pytest.raises(ValueError, match=r"no such checkpoint for \['scaat_s0'\]"):
        evaluated_checkpoints(best, manifest)


def test_save_model_commits_the_last_and_the_best_checkpoint(tmp_path):
    from pipelines import storage as st
    from pipelines.train import _save_model

    store = st.Storage(str(tmp_path))
    recs = [(1, {"val_acc": 0.6, "val_worst_group_acc": 0.4}, b"one"),
            (2, {"val_acc": 0.7, "val_worst_group_acc": 0.3}, b"two")]
    ck = _save_model(store, "erm_s0", "h1", recs, mode="erm", seed=0)
    assert (tmp_path / "train/erm_s0/model.pt").read_bytes() == b"two"
    assert (tmp_path / "train/erm_s0/best.pt").read_bytes() == b"one"
    assert ck == {"last": {"epoch": 2, "path": "train/erm_s0/model.pt", "val_acc": 0.7, "val_worst_group_acc": 0.3},
                  "best_val_worst_group": {"epoch": 1, "path": "train/erm_s0/best.pt", "val_acc": 0.6,
                                           "val_worst_group_acc": 0.4}}
    assert st.committed(store, "train/erm_s0", "h1")["checkpoints"] == ck
    recs[1] = (2, {"val_acc": 0.7, "val_worst_group_acc": float("nan")}, b"two")  # nothing to select on
    ck = _save_model(store, "erm_s0", "h2", recs[1:], mode="erm", seed=0)
    assert ck["best_val_worst_group"] == {"epoch": 2, "path": "train/erm_s0/model.pt", "val_acc": 0.7,
                                          "val_worst_group_acc": None}
    assert not (tmp_path / "train/erm_s0/best.pt").exists()  # the stage's folder was begun again


def test_jtt_and_group_balanced_rows_are_weighted_like_consistency():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = {"image": torch.zeros(3, 3, 4, 4), "label": torch.tensor([0, 0, 1]), "w": torch.tensor([0.5, 2.0, 0.5])}
    want, _, _ = batch_loss(Fixed(logits), batch, "consistency", _cfg())
    for mode in ("jtt", "group_balanced"):
        got, _, extra = batch_loss(Fixed(logits), batch, mode, _cfg())
        assert float(got) == float(want) and extra["w_mean"] == pytest.approx(1.0)


def test_group_weights_by_hand():
    """8 aligned (group 0) and 2 conflicting (group 1): each group gets half the total weight, w = 10 / (2 x 8)
    and 10 / (2 x 2); mean 1; a row without a group is an error."""
    from pipelines.train import group_weights

    w = group_weights(np.array([0] * 8 + [1] * 2))
    np.testing.assert_allclose(w, [0.625] * 8 + [2.5] * 2)
    assert w.mean() == pytest.approx(1.0) and w[-1] / w[0] == 4.0
    np.testing.assert_allclose(group_weights(np.array([3, 0, 3, 1])), [2 / 3, 4 / 3, 2 / 3, 4 / 3])
    with pytest.raises(ValueError, match="needs every training row's group .* 1 of 3 rows have none"):
        group_weights(np.array([0, 1, -1]))


def test_jtt_weights_by_hand():
    """Error set {1, 3} of 5 at lambda_up 6: raw weights 1, 6, 1, 6, 1 (mean 3) -> 1/3, 2, 1/3, 2, 1/3."""
    from pipelines.train import jtt_weights

    np.testing.assert_allclose(jtt_weights(np.array([0, 1, 0, 1, 0]), 6.0), [1 / 3, 2, 1 / 3, 2, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(jtt_weights(np.zeros(4, bool), 6.0), [1.0] * 4)


def test_adv_controls_attack_where_they_say_with_scaats_budget():
    from xai_core.objectives import scaat_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    res = {r: scaat_loss(model, x, y, keep=0.25, generator=torch.Generator().manual_seed(1), region=r)
           for r in ("saliency", "whole", "random")}
    assert res["whole"].region.all()
    for r in ("random", "saliency"):  # keep 0.25 of 64 pixels
        assert (res[r].region.flatten(1).sum(1) == 16).all()
    assert not torch.equal(res["random"].region, res["saliency"].region)
    torch.testing.assert_close(res["whole"].eps_i, res["saliency"].eps_i)  # the same per-sample budget
    for r in ("saliency", "random"):  # the attack changed nothing outside its region
        assert torch.equal(res[r].x_adv[~res[r].region.expand_as(x)], x[~res[r].region.expand_as(x)])
    again = scaat_loss(model, x, y, keep=0.25, generator=torch.Generator().manual_seed(1), region="random")
    assert torch.equal(again.region, res["random"].region)  # seeded
    loss, _, _ = batch_loss(model, {"image": x, "label": y}, "adv_whole", _cfg("scaat.lam=0"))
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(model(x), y)), rel=1e-6)
    with pytest.raises(ValueError, match="region='all': allowed values are saliency, whole, random"):
        scaat_loss(model, x, y, region="all")


def test_new_modes_hash_their_own_sections():
    from pipelines.common import model_hash

    base = _cfg("train.modes=[erm, jtt, group_balanced, adv_whole, adv_random]")
    h = {m: model_hash(base, m, 0) for m in ("erm", "jtt", "group_balanced", "adv_whole", "adv_random")}
    assert len(set(h.values())) == 5
    jtt = _cfg("train.modes=[erm, jtt, group_balanced, adv_whole, adv_random]", "jtt.lambda_up=20")
    assert [model_hash(jtt, m, 0) == h[m] for m in h] == [True, False, True, True, True]
    scaat = _cfg("train.modes=[erm, jtt, group_balanced, adv_whole, adv_random]", "scaat.keep=0.3")
    assert [model_hash(scaat, m, 0) == h[m] for m in h] == [True, True, True, False, False]
    with pytest.raises(Exception, match="group_balanced weights the training rows by their group"):
        load_config(ROOT / "configs/smoke.yaml", ["train.modes=[erm, group_balanced]", "data.source=folder",
                                                  "data.folder=/nowhere"])


def test_a_rounds_optimizer_continues_resets_or_takes_its_own_lr():
    """make_optimizer: the checkpoint's Adam moments are continued (train.lr) unless consistency.reset_optimizer;
    consistency.lr replaces the lr the loaded state would bring back."""
    from pipelines.train import make_optimizer, round_start

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    cfg = _cfg()
    cont = make_optimizer(model, cfg, state)
    moments = [cont.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(moments, model.parameters(), strict=True))
    assert cont.param_groups[0]["lr"] == cfg.train.lr
    own = make_optimizer(model, cfg, state, lr=0.05)
    assert own.param_groups[0]["lr"] == 0.05 and len(own.state) == 2  # moments kept, lr replaced
    fresh = make_optimizer(model, cfg, state, lr=0.05, reset=True)
    assert fresh.param_groups[0]["lr"] == 0.05 and len(fresh.state) == 0
    assert len(make_optimizer(model, cfg, None).state) == 0
    assert round_start(cfg, "train/x_round1.pt") == "train/x_round1.pt"
    assert round_start(_cfg("consistency.init=scratch"), "train/x_round1.pt") is None


def test_each_mode_is_evaluated_with_its_own_methods():
    from pipelines.evaluate import methods_of

    cfg = _cfg("evaluate.methods=[saliency, gradcam, tif, haf]", "evaluate.mode_methods={scaat: [saliency, gradcam]}")
    assert methods_of(cfg, "scaat_s3") == ["saliency", "gradcam"]
    assert methods_of(cfg, "erm_s0") == methods_of(cfg, "random_s0") == ["saliency", "gradcam", "tif", "haf"]
    only = _cfg("evaluate.methods=[saliency, gradcam, tif]", "evaluate.mode_methods={erm: [tif, saliency]}")
    assert methods_of(only, "random_s1") == ["saliency", "tif"]  # evaluate.methods' order; random = ERM's copy
    with pytest.raises(ValueError, match=r"evaluate.mode_methods.scaat: \['haf'\] not in evaluate.methods"):
        _cfg("evaluate.methods=[saliency]", "evaluate.mode_methods={scaat: [haf]}")
