"""The training loop itself: one record per step without a per-step wait for the device."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fdpipe.runtime import Ranks
from fdpipe.training import LoopSettings, RunFiles, Step, Trainer, make_schedule


def tiny_run(tmp_path, log_every: int, monkeypatch=None, on_epoch_end=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    xs = torch.randn(40, 4)
    ys = xs.sum(1, keepdim=True)
    loop = LoopSettings(epochs=2, batch_size=4, clip_grad=1.0, log_every=log_every, quiet=True)
    schedule = make_schedule(loop, len(xs), 0.1)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      lambda batch, pos: Step((batch[0],), batch[1], len(batch[0])),
                      lambda out, y: (torch.nn.functional.mse_loss(out, y), {}), torch.device("cpu"), loop)
    run = RunFiles(tmp_path, tmp_path / "state.pt", Ranks(), {}, lambda state: None)
    pos = run.begin(trainer, False)

    def data(epoch, start):
        return [(xs[i:i + 4], ys[i:i + 4]) for i in range(start, len(xs), 4)]

    if monkeypatch is not None:  # any per-step read of a tensor's value would wait for the device on CUDA
        def refuse(self, *a, **k):
            raise AssertionError("a tensor was read on the host inside the step")

        monkeypatch.setattr(torch.Tensor, "item", refuse)
        monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    trainer.fit(run, schedule, data, pos, on_epoch_end=on_epoch_end)
    if monkeypatch is not None:
        monkeypatch.undo()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_grouped_logging_keeps_one_exact_record_per_step(tmp_path):
    every = tiny_run(tmp_path / "a", log_every=1)
    grouped = tiny_run(tmp_path / "b", log_every=7)
    assert len(every) == len(grouped) == 20
    for a, b in zip(every, grouped):
        assert (a["step"], a["epoch"], a["loss"], a["grad_norm"], a["lr"]) == \
               (b["step"], b["epoch"], b["loss"], b["grad_norm"], b["lr"])


def test_steps_never_read_a_tensor_value_on_the_host(tmp_path, monkeypatch):
    records = tiny_run(tmp_path, log_every=10, monkeypatch=monkeypatch)
    assert [r["step"] for r in records] == list(range(1, 21))


def test_samples_per_s_leaves_out_the_time_between_epochs(tmp_path):
    """An evaluation after each epoch (here 1 s) is not training: the next epoch's rate does not count it.

    Before, finetune's rate over a run that evaluated 10,000 images every epoch was mostly the evaluation's."""
    records = tiny_run(tmp_path, log_every=10, on_epoch_end=lambda *a: time.sleep(1.0))
    second = [r for r in records if r["epoch"] == 1]
    assert len(second) == 10 and second[0]["samples_per_s"] > 10 * 4 / 1.0  # 10 steps of 4 samples, well under 1 s


@pytest.mark.parametrize("value", [0, -3])
def test_log_every_below_one_is_one_line(cli, tmp_path, value):
    r = cli("distill", "--store", tmp_path / "none", "--out", tmp_path / "run", "--log-every", value)
    assert r.exit_code == 1 and "--log-every must be at least 1" in r.output


def _log_two_parts(rank: int, port: int, out: str) -> None:
    """One rank of test_each_logged_loss_part_is_the_mean_over_ranks: its own loss and per-teacher parts."""
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from fdpipe.runtime import JsonlLog
    from fdpipe.training import Position
    from fdpipe.training.loop import PendingLog

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        log = PendingLog(JsonlLog(out, enabled=rank == 0), SimpleNamespace(set_postfix=lambda **_: None),
                         torch.device("cpu"), 2, {"kind": "train"})
        for step in range(3):
            r = float(rank + 1)  # rank 0 logs 1, 10, 100 (x step+1); rank 1 logs twice that
            log.add(Position(epoch=0, step=step), 1e-3, torch.tensor(r * (step + 1)), torch.tensor(0.5),
                    {"loss/a": torch.tensor(10 * r * (step + 1)), "loss/b": torch.tensor(100 * r * (step + 1))})
        log.flush()
    finally:
        dist.destroy_process_group()


def test_each_logged_loss_part_is_the_mean_over_ranks(tmp_path):
    """Under DDP the per-teacher losses (loss/<teacher>) are each rank's own: the log holds their mean over ranks,
    as it does for the total loss (rank 0 alone logged its own half of the batch before)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "metrics.jsonl"
    mp.spawn(_log_two_parts, args=(port, str(out)), nprocs=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["loss"], r["loss/a"], r["loss/b"], r["grad_norm"]) for r in rows] == [
        (1.5 * k, 15.0 * k, 150.0 * k, 0.5) for k in (1, 2, 3)]
