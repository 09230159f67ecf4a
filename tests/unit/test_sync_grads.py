"""SCAAT under two DDP workers (gloo, two processes) takes the step one worker takes on the whole batch.

train_loop computes SCAAT's loss on the unwrapped module (its saliency pass and PGD forwards bypass DDP's
reducer) and averages the gradients itself with ``train.sync_grads``. Each worker here gets half of a batch
of 8 and a PGD start drawn from the one-worker run's generator stream (worker 1's generator is advanced by
worker 0's draw), so the two halves together see exactly the one-worker batch and noise. The model has no
BatchNorm: with it, per-worker batch statistics differ from the whole batch's by design.
"""

import os
import socket

import torch
import torch.multiprocessing as mp

from tests.unit._models import TinyCNN

SEED = 123


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(8, 3, 12, 12, generator=g), "label": torch.arange(8) % 4}


def _cfg():
    from pipelines.config import ROOT, load_config

    return load_config(ROOT / "configs/smoke.yaml", ["scaat.steps=3", "scaat.keep=0.5", "scaat.lam=1.0"])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from pipelines.train import batch_loss, sync_grads

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TinyCNN(num_classes=4, seed=0))  # as prepare_model
        full = _batch()
        half = {k: v[4 * rank: 4 * rank + 4] for k, v in full.items()}
        gen = torch.Generator().manual_seed(SEED)
        if rank == 1:  # the one-worker run draws worker 0's half of the PGD start first
            torch.rand(half["image"].shape, generator=gen)
        loss, _, _ = batch_loss(model, half, "scaat", _cfg(), gen)
        loss.backward()
        sync_grads(model)
        torch.save({"grads": {n.removeprefix("module."): g for n, g in _grads(model).items()},
                    "loss": float(loss)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_with_sync_grads_equal_one_worker_on_the_whole_batch(tmp_path):
    from pipelines.train import batch_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")

    model = TinyCNN(num_classes=4, seed=0)
    loss, _, _ = batch_loss(model, _batch(), "scaat", _cfg(), torch.Generator().manual_seed(SEED))
    loss.backward()
    ref = _grads(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - float(loss.detach())) < 1e-6  # mean of the half means
    for r in ranks:
        assert set(r["grads"]) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    # without the averaging the workers' gradients differ from the whole batch's: the check can fail
    half_model = TinyCNN(num_classes=4, seed=0)
    gen = torch.Generator().manual_seed(SEED)
    loss0, _, _ = batch_loss(half_model, {k: v[:4] for k, v in _batch().items()}, "scaat", _cfg(), gen)
    loss0.backward()
    assert any(not torch.allclose(p.grad, ref[n], atol=1e-4) for n, p in half_model.named_parameters())
