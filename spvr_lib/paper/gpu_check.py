"""``make gpu-check``: the CUDA paths, exercised in under five minutes, one JSON line per check.

Run it whenever a GPU is available (``python -m spvr_lib.paper.gpu_check``); on a machine without CUDA
every check prints ``"status": "skipped"`` and the command still exits 0 (the project never needs a GPU).

Checks: the training loop with bfloat16 autocast (the loss falls; images/s); fast against naive ranking
(identical rankings, max relative difference); latency with CUDA events; DistributedDataParallel over
every visible GPU (NCCL; identical weights on every rank); and two timings for the paper-scale plan: one
full-width VGG16 ranking on 500 CIFAR-sized images and one ResNet50 training pass at 224 px.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spvr_lib import latency, models, ranking, train
from spvr_lib.data import InMemoryImages
from spvr_lib.paper.bench import same_ranking
from spvr_lib.prune import network_units, unit_groups

CHECKS: list[tuple[str, Callable[[], dict[str, Any]]]] = []
DEVICE = "cuda"            # ``--device cpu`` runs the checks' code on the CPU (a dry run: tests, no GPU needed)


def check(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    CHECKS.append((fn.__name__, fn))
    return fn


def _images(n: int, size: int, classes: int = 10, seed: int = 0) -> InMemoryImages:
    """Noise images whose brightness says their class: something a network learns within an epoch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    pixels = (labels * (200 // classes)).view(-1, 1, 1, 1) + torch.randint(0, 40, (n, 3, size, size), generator=g)
    return InMemoryImages(pixels.to(torch.uint8), labels, classes=[str(c) for c in range(classes)],
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_padding=4, augment=True, seed=seed)


@check
def training_loop_bf16() -> dict[str, Any]:
    torch.manual_seed(0)
    model = models.build(models.vgg16_bn(num_classes=10, in_channels=3, width=0.25))
    data = _images(2048, 32)
    t = time.perf_counter()
    out = train.fit(model, data, _images(256, 32, seed=1), train.Recipe(epochs=3, batch_size=128, lr=0.05, amp=True),
                    device=DEVICE, progress=False)
    losses = [h["train_loss"] for h in out["history"]]
    return {"ok": losses[-1] < losses[0], "train_loss": losses, "img_s": round(3 * 2048 / (time.perf_counter() - t))}


@check
def fast_vs_naive_ranking() -> dict[str, Any]:
    rows = {}
    for name, spec in (("vgg16", models.vgg16_bn(10, 3, width=0.25)), ("resnet34", models.resnet34(10, 3, width=0.25))):
        torch.manual_seed(0)
        model = models.build(spec).to(DEVICE).eval()
        x = torch.randn(64, 3, 32, 32)
        groups = unit_groups(model, network_units(model, x), x, 4)
        fast = ranking.group_importance(model, x, groups, method="fast", progress=False)
        naive = ranking.group_importance(model, x, groups, method="naive", progress=False)
        f, n = torch.cat([fast[k] for k in groups]), torch.cat([naive[k] for k in groups])
        rows[name] = {"same_ranking": same_ranking(n.cpu(), f.cpu())[0],
                      "exact_order": bool(torch.equal(f.argsort(stable=True), n.argsort(stable=True))),
                      "max_rel_diff": float(((f - n).abs() / n.abs().clamp(min=1e-12)).max())}
    return {"ok": all(r["same_ranking"] for r in rows.values()), **rows}


@check
def latency_cuda_events() -> dict[str, Any]:
    model = models.build(models.resnet50(1000, 3, stem="imagenet"))
    rec = latency.measure_latency(model, (3, 224, 224), batch_size=1, runs=100 if DEVICE == "cuda" else 3,
                                 warmup=20 if DEVICE == "cuda" else 1, device=DEVICE)
    return {"ok": rec["mean_ms"] > 0 and rec["device"].startswith(DEVICE), "mean_ms": rec["mean_ms"],
            "std_ms": rec.get("std_ms")}


def _ddp_worker(rank: int, world: int, port: int, out: str, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = models.build(models.resnet18(10, 3, width=0.25))
    train.fit(model, _images(512, 32), _images(128, 32, seed=1), train.Recipe(epochs=1, batch_size=64 * world,
                                                                                lr=0.05, amp=True),
              device=f"cuda:{rank}" if device == "cuda" else "cpu", progress=False)
    digests = [None] * world
    dist.all_gather_object(digests, train.state_dict_digest(model.state_dict()))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(digests, fh)
    dist.destroy_process_group()


@check
def ddp_all_gpus() -> dict[str, Any]:
    world = torch.cuda.device_count() if DEVICE == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "digests.json")
        mp.spawn(_ddp_worker, args=(world, 29500 + os.getpid() % 1000, out, DEVICE), nprocs=world, join=True)
        with open(out) as fh:
            digests = json.load(fh)
    return {"ok": len(set(digests)) == 1, "world_size": world}


@check
def full_width_ranking_and_epoch() -> dict[str, Any]:
    if DEVICE != "cuda":
        return {"ok": True, "skipped": "full-width timings only mean something on the GPU"}
    torch.manual_seed(0)
    vgg = models.build(models.vgg16_bn(10, 3)).cuda().eval()
    x = torch.randn(500, 3, 32, 32)
    torch.cuda.synchronize()
    t = time.perf_counter()
    groups = unit_groups(vgg, network_units(vgg, x), x, 2)
    ranking.group_importance(vgg, x, groups, method="fast", progress=False)
    torch.cuda.synchronize()
    rank_s = time.perf_counter() - t
    r50 = models.build(models.resnet50(1000, 3, stem="imagenet")).cuda()
    opt = train.make_optimizer(r50, train.Recipe(epochs=1, batch_size=128, lr=0.1))
    xb, yb = torch.randn(128, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (128,), device="cuda")
    for i in range(13):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(r50(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    img_s = 10 * 128 / (time.perf_counter() - t)
    return {"ok": True, "vgg16_full_width_ranking_s_500_images_d2": round(rank_s, 2),
            "resnet50_224px_train_img_s_bf16": round(img_s, 1),
            "resnet50_imagenet_epoch_h_at_that_rate": round(1.28e6 / img_s / 3600, 3)}


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--device"] and args[1:2] == ["cpu"]:
        DEVICE = "cpu"
    elif args:
        print(f"error: unknown arguments {args}; expected nothing or --device cpu", file=sys.stderr)
        return 2
    if DEVICE == "cuda" and not torch.cuda.is_available():
        for name, _ in CHECKS:
            print(json.dumps({"check": name, "status": "skipped", "reason": "CUDA is not available on this machine"}))
        return 0
    failed = 0
    for name, fn in CHECKS:
        t = time.perf_counter()
        try:
            result = fn()
            status = "ok" if result.pop("ok") else "failed"
        except Exception as err:                             # one failed check never hides the others
            result, status = {"error": f"{type(err).__name__}: {err}"}, "error"
        failed += status != "ok"
        where = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)"
        print(json.dumps({"check": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                          "device": where, **result}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
