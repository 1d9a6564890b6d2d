"""Shared training machinery: checkpoints, loaders, metric log, distributed and AMP helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cxrlib.train import engine
from cxrlib.train.engine import (
    CheckpointError,
    DistContext,
    MetricLogger,
    load_checkpoint,
    make_loader,
    save_checkpoint,
    set_loader_epoch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def single(monkeypatch) -> DistContext:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return engine.init_distributed("cpu")


@dataclass
class _Settings:
    lr: float = 0.01
    where: Path = Path("runs/x")


def _trained_state(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 1, 6, 6))  # materialise the lazy layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    for _ in range(3):
        loss = model(torch.randn(4, 1, 6, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def test_single_process_context_without_torchrun(single):
    assert single == DistContext(device=torch.device("cpu"))
    assert single.is_main and not single.is_distributed
    assert engine.all_reduce_mean(2.5, single) == 2.5
    assert torch.equal(engine.all_reduce_sum(torch.ones(2), single), torch.ones(2))
    model = nn.Linear(2, 2)
    assert engine.wrap_ddp(model, single) is model and engine.unwrap(model) is model
    engine.barrier()  # no process group: returns at once


def test_checkpoint_round_trip(tmp_path):
    model, optimizer, scheduler = _trained_state()
    scaler = engine.make_grad_scaler("cpu")
    path = save_checkpoint(tmp_path / "run" / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, epoch=3, step=42, best_metric=0.75, config=_Settings(),
                           extra={"best_epoch": 2})

    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 3 and raw["step"] == 42 and raw["best_metric"] == 0.75
    assert raw["config"] == {"lr": 0.01, "where": "runs/x"} and raw["extra"] == {"best_epoch": 2}
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == raw["config"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]

    fresh_model, fresh_optimizer, fresh_scheduler = _trained_state(seed=1)
    loaded = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                             scaler=engine.make_grad_scaler("cpu"))
    assert loaded["epoch"] == 3 and loaded["path"] == str(path)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], value), name
    _assert_same_optimizer_state(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert engine.latest_checkpoint(tmp_path / "run") == path
    assert engine.latest_checkpoint(tmp_path / "empty") is None


def test_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(missing, model=nn.Linear(2, 2))
    corrupt = tmp_path / "corrupt.pt"
    model, optimizer, _ = _trained_state()
    save_checkpoint(corrupt, model=model, optimizer=optimizer, epoch=1, step=1, config={})
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # a write cut short
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(corrupt, model=model)
    good = save_checkpoint(tmp_path / "good.pt", model=model, epoch=1, step=1, config={})
    with pytest.raises(CheckpointError, match="good.pt"):
        load_checkpoint(good, model=nn.Linear(3, 3))


def test_loader_order_depends_only_on_seed_and_epoch(single):
    dataset = TensorDataset(torch.arange(20))

    def order(seed: int, epoch: int) -> list[int]:
        loader = make_loader(dataset, 4, shuffle=True, seed=seed, ctx=single)
        set_loader_epoch(loader, epoch)
        return torch.cat([batch[0] for batch in loader]).tolist()

    assert order(7, 1) == order(7, 1)
    assert sorted(order(7, 1)) == list(range(20))
    assert order(7, 1) != order(7, 2)
    assert order(7, 1) != order(8, 1)
    ordered = make_loader(dataset, 6, shuffle=False, seed=0, ctx=single, pad_to_even=False)
    assert torch.cat([b[0] for b in ordered]).tolist() == list(range(20))


def test_loader_shards_cover_the_data_once_for_evaluation():
    dataset = TensorDataset(torch.arange(7))
    shards = [
        torch.cat([b[0] for b in make_loader(dataset, 2, shuffle=False, seed=0, pad_to_even=False,
                                             ctx=DistContext(rank=rank, world_size=2))]).tolist()
        for rank in range(2)
    ]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    padded = [len(make_loader(dataset, 1, shuffle=True, seed=0, ctx=DistContext(rank=r, world_size=2)))
              for r in range(2)]
    assert padded == [4, 4]  # training shards are padded to equal length (DDP steps in lockstep)


def test_set_loader_epoch_reaches_the_dataset(single):
    class EpochAware(TensorDataset):
        epoch = -1

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

    dataset = EpochAware(torch.arange(4))
    set_loader_epoch(make_loader(dataset, 2, shuffle=True, seed=0, ctx=single), 5)
    assert dataset.epoch == 5


def test_metric_logger_appends_truncates_and_reloads(tmp_path):
    logger = MetricLogger(tmp_path)
    for epoch in (1, 2, 3):
        logger.log({"epoch": epoch, "loss": 1.0 / epoch})
    logger.drop_after(2)
    reloaded = MetricLogger(tmp_path)
    assert reloaded.frame()["epoch"].tolist() == [1, 2]
    silent = MetricLogger(tmp_path / "other", enabled=False)
    silent.log({"epoch": 1})
    assert silent.frame()["epoch"].tolist() == [1] and not (tmp_path / "other").exists()


def test_seed_epoch_repeats_draws():
    engine.seed_epoch(0, 3)
    first = torch.rand(3)
    engine.seed_epoch(0, 3)
    assert torch.equal(torch.rand(3), first)
    engine.seed_epoch(0, 4)
    assert not torch.equal(torch.rand(3), first)


def test_amp_helpers_are_pass_through_on_cpu():
    scaler = engine.make_grad_scaler("cpu", enabled=True)
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0, requires_grad=True)
    assert scaler.scale(loss) is loss
    with engine.autocast_context("cpu", enabled=True):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_init_distributed_asks_for_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already running in this process")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        engine.init_distributed("cpu")
