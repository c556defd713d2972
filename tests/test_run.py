"""The loop pieces both training scripts share (training/run.py)."""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, IterableDataset

from tocom_hub.training import run


class _Stream(IterableDataset):
    """A streamed dataset (like timm's hfids/ / wds/ readers): no random access, an epoch counter."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.arange(self.n) + 100 * self.epoch)


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_a_resumed_streamed_epoch_drops_the_batches_the_checkpoint_used():
    acc = _accelerator()
    stream = _Stream(10)
    loader = DataLoader(stream, batch_size=2)
    got = [b.tolist() for b in run.epoch_loader(acc, loader, None, epoch=3, skip=2, dataset=stream)]
    assert stream.epoch == 3
    assert got == [[304, 305], [306, 307], [308, 309]]  # the first two batches of epoch 3 are skipped
    assert [b.tolist() for b in run.epoch_loader(acc, loader, None, epoch=4, skip=0, dataset=stream)][0] == [400, 401]


def test_backward_step_updates_only_when_gradients_are_accumulated():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    w = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(w.parameters(), lr=1.0)
    w, opt = acc.prepare(w, opt)

    class Sched:
        steps = []

        def step_update(self, step):
            self.steps.append(step)

    sched, start = Sched(), w.weight.detach().clone()
    x = torch.ones(1, 2)
    with acc.accumulate(w):
        run.backward_step(acc, w(x).sum(), opt, sched, 0)
    assert torch.equal(w.weight, start) and sched.steps == []  # first micro-step: accumulate only
    with acc.accumulate(w):
        run.backward_step(acc, w(x).sum(), opt, sched, 0)
    # d(sum of two micro-batches, each scaled by 1/2)/dw = [1, 1]; SGD lr 1
    assert torch.equal(w.weight, start - 1.0) and sched.steps == [0]


def test_after_step_checkpoints_on_schedule_and_says_when_to_stop(tmp_path, monkeypatch):
    class Recorder:  # the accelerator seam: save_checkpoint calls only these
        is_main_process = True
        saved = []

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            self.saved.append(path)

    acc = Recorder()
    args = argparse.Namespace(checkpoint_every=2, stop_after=3, output_dir=str(tmp_path))
    stops = [run.after_step(args, acc, step, {}, run.logging.getLogger("test")) for step in (1, 2, 3, 4)]
    assert [p.rsplit("_", 1)[-1] for p in acc.saved] == ["00000002", "00000004"]
    assert stops == [False, False, True, True]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
