"""The whole pipeline: ingest -> train (erm, consistency rounds with precompute, scaat) -> sweep -> evaluate
-> report, on the Ray cluster it finds (a job's cluster, RAY_ADDRESS, ray.address) or a local one.

    python pipelines/full.py --config configs/quick.yaml [--set train.epochs=3 ...] [--force STAGE]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/full.py ...

A rerun with the same config skips every committed stage and says so. One MLflow parent run per
pipeline run (found again by tag on a rerun), nested runs per stage, model and trial.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import STAGES, ConfigError, load_config  # noqa: E402

log = logging.getLogger("xai")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="full.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quick.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--force", action="append", default=[], choices=STAGES, help="redo a committed stage")
    p.add_argument("--only", choices=STAGES, help="run only this stage (earlier stages must be committed)")
    p.add_argument("--until", choices=STAGES, help="run the stages up to and including this one, then stop")
    p.add_argument("--alphas", type=float, nargs="+", help="sweep: alphas to try (default: sweep.alphas)")
    args = p.parse_args(argv)
    if args.only and args.until:
        p.error("--only and --until exclude each other")
    return args


def init_ray(cfg: object) -> float:
    """Connect to the cluster we were submitted to, or start a local one; returns its CPU count."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0")}}
    if ray.is_initialized():  # embedded use (tests, notebooks): reuse the caller's Ray instance
        pass
    elif address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = cfg.ray.num_cpus or 2 * (os.cpu_count() or 1)  # logical > physical: RAY_NOTES
        # address="local": always a fresh local cluster, never a stale one from /tmp/ray/ray_current_cluster.
        # The dashboard (on 127.0.0.1) serves the state API that Ray Train's PlacementGroupCleaner polls:
        # without it a Tune trial's TorchTrainer stopped by ASHA leaks its placement group (and its CPUs).
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=env, log_to_driver=True)
        session = _session_dir()
        if session:  # registered after Ray's own exit handler, so it runs first: shut down, then reap
            atexit.register(_shutdown_and_reap, session)
    from pipelines.common import quiet_ray_console

    quiet_ray_console()
    return float(ray.cluster_resources().get("CPU", 1))


def _session_dir() -> str | None:
    try:
        from ray._private.worker import global_worker

        return global_worker.node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - a private API: without it nothing is reaped
        return None


def reap_session_processes(session_dir: str) -> list[int]:
    """SIGKILL processes still writing to ``session_dir``'s logs (their stdout or stderr is a file there);
    returns their PIDs. Linux (/proc) only; elsewhere a no-op.

    For the local Ray this driver started, after ``ray.shutdown()``. In a paper run one TrainController
    process of eleven (Ray 2.60) outlived the cluster: its core worker logged "Shutdown complete" and the
    Python process stayed, 1 GiB resident, parented to init, until killed by hand."""
    import signal

    logs = os.path.join(os.path.realpath(session_dir), "logs") + os.sep
    killed = []
    if not os.path.isdir("/proc"):
        return killed
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)]
        except OSError:  # gone, not ours to read, or no such fd
            continue
        if any(t.startswith(logs) for t in targets):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except OSError:
                pass
    return killed


def _shutdown_and_reap(session_dir: str) -> None:
    import ray

    ray.shutdown()
    time.sleep(2.0)  # let the processes that exit on their own do so
    if killed := reap_session_processes(session_dir):
        print(f"killed {len(killed)} process(es) left over from the local Ray session: {killed}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run_pipeline(cfg, args)
    except Exception as e:  # noqa: BLE001 - the entry point turns errors into a message and an exit code
        known = isinstance(e, (ValueError, RuntimeError, OSError, ConnectionError)) or \
            type(e).__module__.startswith(("mlflow", "ray"))
        if not known or os.environ.get("XAI_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def run_pipeline(cfg: object, args: argparse.Namespace) -> int:
    from pipelines import evaluate, ingest, report, sweep, train
    from pipelines import storage as st
    from pipelines.common import default_alphas, resource_plan
    from pipelines.tracking import Tracker, git_revision, redact, tracking_uri

    t0 = time.time()
    if cfg.model.weights is not None:  # a checkpoint for another architecture fails here, before Ray starts
        from pipelines.common import make_model

        make_model(cfg)
    store = st.from_config(cfg)
    uri = tracking_uri(cfg.tracking.uri)
    tracker = Tracker(uri, cfg.tracking.experiment)  # fails fast on an unreachable server
    cluster_cpus = init_ray(cfg)
    plan = resource_plan(cluster_cpus, cfg.train.num_workers, cfg.precompute.actors)
    log.info("storage %s, tracking %s, cluster CPUs %g, plan %s", store.root_uri, redact(uri), cluster_cpus, plan)
    parent = tracker.find_or_create(cfg.name, {"xai.pipeline": cfg.name, "xai.config_hash": cfg.section_hash(
        *[k for k in type(cfg).model_fields if k not in ("ray", "tracking", "name")])})
    tracker.log_params(parent, cfg.model_dump(mode="json"))
    tracker.set_tags(parent, {"git_revision": git_revision(), "storage": store.root_uri,
                              "config_file": str(args.config)})
    force = set(args.force)
    done: list[str] = []
    skipped: list[str] = []

    def stage_run(name: str) -> str:
        return tracker.find_or_create(name, {"xai.stage": name, "xai.stage_of": parent}, parent_id=parent)

    def note(name: str, did: bool, run_id: str) -> None:
        (done if did else skipped).append(name)
        log.info("stage %s: %s", name, "done" if did else "already committed, skipped")
        tracker.finish(run_id)

    def wanted(name: str) -> bool:
        return args.only in (None, name)

    def last(name: str) -> bool:  # --only NAME / --until NAME: stop after that stage
        return name in (args.only, args.until)

    def need(name: str, manifest: object) -> dict:
        if manifest is None:
            raise RuntimeError(f"stage {name} is not committed under {store.root_uri}: run the full pipeline first")
        return manifest

    def run_stages() -> None:  # returns after the stage that --only or --until names
        nonlocal cfg  # the training-knob sweep's best settings replace the swept keys
        r = stage_run("ingest")
        if wanted("ingest"):
            ing, did = ingest.run(cfg, store, force="ingest" in force)
            tracker.log_metrics(r, {f"rows_{k}": v for k, v in ing["rows"].items()})
            note("ingest", did, r)
        if last("ingest"):
            return
        ing = need("ingest", st.committed(store, ingest.STAGE, ingest.config_hash(cfg)))
        if cfg.tune.spaces:  # the training-knob sweep: each swept mode's best setting is what train trains
            if wanted("tune"):
                r = stage_run("tune")
                best, did = sweep.run_knobs(cfg, store, ing, tracker, r, plan, force="tune" in force)
                note("tune", did, r)
            else:
                best = need("tune", sweep.committed_knobs(cfg, store))
            cfg = sweep.tuned_config(cfg, best)
            tracker.set_tags(parent, {"tuned_knobs": json.dumps(sweep.merged_knobs(best), sort_keys=True)})
        if last("tune"):
            return
        r = stage_run("train")
        if wanted("train"):
            tr, did = train.run(cfg, store, ing, tracker, r, plan, force="train" in force)
            note("train", did, r)
        if last("train"):
            return
        tr = need("train", st.committed(store, train.STAGE, train.config_hash(cfg)))
        alphas, sweep_result = default_alphas(cfg), None
        calibrated = cfg.sweep.haf_lrs and any(evaluate.base_method(m) == "haf" for m in cfg.evaluate.methods)
        if cfg.sweep.enabled and ("tif" in cfg.evaluate.methods or calibrated or "sweep" in (args.only, args.until)):
            r = stage_run("sweep")
            if wanted("sweep"):
                sw, did = sweep.run(cfg, store, ing, tr, tracker, r, plan, force="sweep" in force,
                                    alphas=args.alphas)
                note("sweep", did, r)
            if store.exists(sweep.STAGE, "results.json"):
                sweep_result = store.read_json(sweep.STAGE, "results.json")
                alphas = sweep.tuned_settings(sweep_result)  # alphas and HAF's steps/lr
        if last("sweep"):
            return
        r = stage_run("evaluate")
        if wanted("evaluate"):
            ev, did = evaluate.run(cfg, store, ing, tr, alphas, tracker, r, plan, force="evaluate" in force)
            note("evaluate", did, r)
        if last("evaluate"):
            return
        ev = need("evaluate", st.committed(store, evaluate.STAGE, evaluate.config_hash(cfg, alphas)))
        r = stage_run("report")
        if wanted("report"):
            rp, did = report.run(cfg, store, ing, tr, ev, sweep_result, tracker, r, force="report" in force)
            note("report", did, r)

    status = "FAILED"
    try:
        run_stages()
        status = "FINISHED"
    finally:
        tracker.finish(parent, status)
    if not done:
        what = f"stage {args.only}" if args.only else "every stage"
        print(f"Nothing to do: {what} of {cfg.name!r} is already committed under {store.root_uri} "
              f"(use --force STAGE to redo one).")
    else:
        print(f"Done in {time.time() - t0:.0f}s: ran {', '.join(done)}"
              + (f"; skipped committed {', '.join(skipped)}" if skipped else "") + ".")
    print(f"Outputs: {store.root_uri}  (report: {store.uri('report', 'report.html')})")
    print(f"MLflow:  {redact(uri)}  -> review with: mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
