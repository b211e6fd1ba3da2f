"""Fine-tuning with distillation: single process, and two processes with DistributedDataParallel (gloo, CPU)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fxprune
from fxprune.finetune import distillation_loss
from helpers import small_vit

X = torch.randn(1, 3, 16, 16)


def _data(seed: int, n: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=generator) for _ in range(n)]


def _gap(model, pruned, data):
    with torch.no_grad():
        return sum(float(distillation_loss(pruned(x), model(x))) for x in data)


def test_distillation_brings_the_pruned_model_closer():
    torch.manual_seed(0)
    model = small_vit(num_heads=2, embed_per_head=8, depth=2)
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    data = _data(0)
    before = _gap(model, pruned, data)
    fxprune.finetune(pruned, data, teacher=model, epochs=4, lr=3e-3, progress=False)
    assert _gap(model, pruned, data) < 0.7 * before
    assert not pruned.training


def test_cosine_feature_distillation_raises_feature_similarity():
    torch.manual_seed(0)
    model = small_vit(num_heads=2, embed_per_head=8, depth=2)
    model.reset_classifier(0)  # features out
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    data = _data(1)

    def gap() -> float:
        with torch.no_grad():
            return sum(float(distillation_loss(pruned(x), model(x), loss="cosine")) for x in data)

    before = gap()
    fxprune.finetune(pruned, data, teacher=model, epochs=4, lr=3e-3, progress=False, loss="cosine")
    assert gap() < 0.7 * before
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert float(distillation_loss(a, 3 * a, loss="cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(a, b, loss="mse")) == pytest.approx(float(((a - b) ** 2).mean()))
    with pytest.raises(fxprune.InvalidArgumentError, match="distillation loss"):
        fxprune.finetune(pruned, data, teacher=model, loss="l7")


def test_labels_only_training_fits_the_labels_and_bad_batches_are_named():
    model = small_vit(num_heads=2, embed_per_head=8, depth=1)
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    generator = torch.Generator().manual_seed(2)
    labelled = [(x, torch.randint(0, 5, (8,), generator=generator)) for x in _data(1, 2)]

    def cross_entropy() -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(pruned(x), y)) for x, y in labelled)

    before, head = cross_entropy(), pruned.get_parameter("head.weight").detach().clone()
    fxprune.finetune(pruned, labelled, epochs=8, lr=3e-3, progress=False)  # no teacher: the labels are the target
    assert cross_entropy() < 0.5 * before
    assert not torch.equal(pruned.get_parameter("head.weight"), head)
    assert not pruned.training
    with pytest.raises(fxprune.InvalidArgumentError, match="teacher"):
        fxprune.finetune(pruned, _data(2, 1), progress=False)
    with pytest.raises(fxprune.InvalidArgumentError, match="batch"):
        fxprune.finetune(pruned, ["not a tensor"], teacher=model, progress=False)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = small_vit(num_heads=2, embed_per_head=8, depth=1)
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    fxprune.finetune(pruned, _data(0, 4), teacher=model, epochs=2, lr=1e-3, progress=False)
    torch.save({k: v.detach() for k, v in pruned.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_keeps_replicas_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    untrained = fxprune.prune(small_vit(num_heads=2, embed_per_head=8, depth=1), 0.5, example_inputs=(X,)).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # gradients were averaged across processes
    assert any(not torch.equal(first[k], untrained[k]) for k in first)  # and training happened
