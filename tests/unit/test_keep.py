"""pipelines.keep: committed units of a run saved to a kept directory and put back on a fresh checkout."""

import json

from pipelines import keep
from pipelines import storage as st


def _unit(store: st.Storage, rel: str, files: dict[str, bytes], h: str = "h1") -> None:
    for name, data in files.items():
        store.write_bytes(data, rel, name)
    st.commit(store, rel, h)


def _tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(tmp_path) -> st.Storage:
    store = st.Storage(str(tmp_path / "runs" / "paper"))
    _unit(store, "ingest", {"test-0.parquet": b"rebuilt from the config"})
    _unit(store, "train/erm_s0", {"model.pt": b"m0"})
    _unit(store, "train/erm_s1", {"model.pt": b"m1", "ckpt/best.pt": b"b1"})
    store.write_bytes(b"half a model", "train/erm_s2", "model.pt")  # in flight: no manifest
    _unit(store, "evaluate/test/0", {"rows-0.parquet": b"r0"})
    _unit(store, "sweep", {"results.json": b"{}", "trials/t0.json": b"t"})
    _unit(store, "report", {"report.html": b"<html>"})
    return store


def test_save_copies_exactly_the_committed_units_but_ingest_and_report(tmp_path):
    store, kept = _run(tmp_path), tmp_path / "artifacts" / "paper"
    assert keep.units(store) == ["evaluate/test/0", "sweep", "train/erm_s0", "train/erm_s1"]
    assert keep.save(store, kept) == ["evaluate/test/0", "sweep", "train/erm_s0", "train/erm_s1"]
    tree = _tree(kept)
    assert {k for k in tree if not k.endswith(st.MANIFEST)} == {
        "evaluate/test/0/rows-0.parquet", "sweep/results.json", "sweep/trials/t0.json",
        "train/erm_s0/model.pt", "train/erm_s1/model.pt", "train/erm_s1/ckpt/best.pt"}
    assert tree["train/erm_s1/ckpt/best.pt"] == b"b1"
    assert json.loads(tree["train/erm_s0/" + st.MANIFEST])["config_hash"] == "h1"
    assert keep.save(store, kept) == []  # nothing new: nothing copied, no temporary left
    assert _tree(kept) == tree


def test_a_stage_committed_later_replaces_its_saved_parts(tmp_path):
    store, kept = _run(tmp_path), tmp_path / "kept"
    keep.save(store, kept)
    _unit(store, "train/erm_s2", {"model.pt": b"m2"})
    st.commit(store, "train", "h1", files={})
    assert keep.save(store, kept) == ["train"]
    assert _tree(kept)["train/erm_s2/model.pt"] == b"m2" and (kept / "train" / st.MANIFEST).is_file()
    assert not [p for p in kept.rglob("*") if ".tmp-" in p.name]


def test_restore_puts_back_what_the_run_lacks_and_leaves_committed_units(tmp_path):
    store, kept = _run(tmp_path), tmp_path / "kept"
    keep.save(store, kept)
    fresh = st.Storage(str(tmp_path / "fresh" / "paper"))
    _unit(fresh, "sweep", {"results.json": b"{\"newer\": 1}"}, h="h2")  # committed here: left as it is
    fresh.write_bytes(b"dead attempt", "train/erm_s0", "partial.pt")  # no manifest: replaced
    assert keep.restore(kept, fresh) == ["evaluate/test/0", "train/erm_s0", "train/erm_s1"]
    tree = _tree(tmp_path / "fresh" / "paper")
    assert tree["train/erm_s1/ckpt/best.pt"] == b"b1" and "train/erm_s0/partial.pt" not in tree
    assert tree["sweep/results.json"] == b"{\"newer\": 1}"
    assert st.committed(fresh, "train/erm_s0", "h1") is not None
    assert keep.restore(kept, fresh) == []
    assert keep.restore(tmp_path / "nothing-kept", fresh) == []


def test_a_restored_stage_keeps_the_manifests_of_its_parts(tmp_path):
    # a committed stage is one kept unit; its models / shards / checks are committed units inside it, which a
    # stage run again (its own manifest deleted or stale) skips: restore must put their manifests back too
    store, kept = _run(tmp_path), tmp_path / "kept"
    _unit(store, "evaluate/checks/erm_s0", {})  # a unit that is only its manifest (the result is inside)
    st.commit(store, "evaluate", "h1", files={})
    st.commit(store, "train", "h1", files={})
    keep.save(store, kept)
    fresh = st.Storage(str(tmp_path / "fresh" / "paper"))
    assert keep.restore(kept, fresh) == ["evaluate", "sweep", "train"]
    for rel in ("evaluate", "evaluate/test/0", "evaluate/checks/erm_s0", "train", "train/erm_s0", "train/erm_s1"):
        assert st.committed(fresh, rel, "h1") is not None, rel
    assert _tree(tmp_path / "fresh" / "paper") == {k: v for k, v in _tree(tmp_path / "runs" / "paper").items()
                                                  if not k.startswith(("ingest/", "report/"))}


def test_precompute_rounds_are_kept_without_their_samples_once_their_model_is_committed(tmp_path):
    store, kept = _run(tmp_path), tmp_path / "kept"
    store.write_bytes(b"w", "precompute/s0_round1", "weights.parquet")
    store.write_bytes(b"images", "precompute/s0_round1", "samples", "part-0.parquet")
    st.commit(store, "precompute/s0_round1", "h1", files={"samples": ["precompute/s0_round1/samples/part-0.parquet"],
                                                          "weights": ["precompute/s0_round1/weights.parquet"]})
    assert "precompute/s0_round1" not in keep.save(store, kept)  # consistency_s0 not trained yet: not kept
    _unit(store, "train/consistency_s0", {"model.pt": b"c0"})
    assert keep.save(store, kept) == ["precompute/s0_round1", "train/consistency_s0"]
    tree = _tree(kept / "precompute")
    assert set(tree) == {"s0_round1/weights.parquet", "s0_round1/" + st.MANIFEST}
    m = json.loads(tree["s0_round1/" + st.MANIFEST])
    assert m["kept_without"] == "samples" and m["files"] == {"samples": [], "weights": [
        "precompute/s0_round1/weights.parquet"]}
    assert keep.save(store, kept) == []  # the slim manifest is what is compared
    fresh = st.Storage(str(tmp_path / "fresh" / "paper"))
    assert "precompute/s0_round1" in keep.restore(kept, fresh)
    assert st.committed(fresh, "precompute/s0_round1", "h1")["kept_without"] == "samples"


def test_a_knob_trial_is_kept_once_it_committed_and_never_half(tmp_path):
    """A finished trial folder (tune/<mode>/trials/<setting>, its manifest at the top) is one unit; a trial still
    training is skipped whole: its inner model unit and its precompute round with the training images are not
    copied (the trial is redone)."""
    store = st.Storage(str(tmp_path / "runs" / "paper"))
    trial = store.scoped("tune/jtt/trials/jtt.lambda_up=4.0")
    _unit(trial, "train/jtt_s100", {"_note": b"models deleted when the trial ended"})
    trial.write_json({"val_acc": 0.5}, "trial.json")
    st.commit(trial, "", "t1")
    running = store.scoped("tune/jtt/trials/jtt.lambda_up=8.0")
    _unit(running, "train/jtt_s100", {"model.pt": b"m"})
    _unit(running, "precompute/s100_round1", {"samples/part-0.parquet": b"images"})
    assert keep.units(store) == ["tune/jtt/trials/jtt.lambda_up=4.0"]
    kept = tmp_path / "kept"
    assert keep.save(store, kept) == ["tune/jtt/trials/jtt.lambda_up=4.0"]
    files = ("_manifest.json", "trial.json", "train/jtt_s100/_note", "train/jtt_s100/_manifest.json")
    assert set(_tree(kept)) == {f"tune/jtt/trials/jtt.lambda_up=4.0/{f}" for f in files}
