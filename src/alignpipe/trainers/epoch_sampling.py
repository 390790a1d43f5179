"""TRL's GRPO/RLOO prompt order, resumable past the first epoch.

Why: TRL 1.16's ``RepeatSampler`` draws each epoch's shuffle from a private generator seeded once, and has no
``set_epoch``. On a resume transformers builds a fresh sampler and only skips the batches already trained in the
current epoch, so a run resumed in epoch 2 or later replayed epoch 1's order from that point: some prompts trained
twice in the epoch and others never, and the weights differed from the uninterrupted run's, without a word. Here
the sampler knows which epoch each pass is (the epochs the checkpoint had finished, then one more per pass) and
draws that epoch's shuffle, the very one an uninterrupted sampler draws in it, so nothing changes for a run that is
never interrupted.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import RepeatSampler

__all__ = ["EpochReplayingRepeatSampler", "resumable_epochs"]


class EpochReplayingRepeatSampler(RepeatSampler):
    """``RepeatSampler`` whose ``k``-th pass (from 0) is epoch ``first_epoch + k``, shuffled as that epoch is in an
    uninterrupted run: the generator is re-seeded and the earlier epochs' permutations are drawn and dropped."""

    def __init__(self, *args, first_epoch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_epoch = first_epoch
        self.passes = 0

    def __iter__(self):
        epoch = self.first_epoch + self.passes
        self.passes += 1
        if self.shuffle and self.seed is not None:  # unseeded, there is no order to replay
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)
        return super().__iter__()


def resumable_epochs(trainer_class: type) -> type:
    """``trainer_class`` (TRL's GRPOTrainer or RLOOTrainer) with its training sampler replaced by
    :class:`EpochReplayingRepeatSampler`. ``first_epoch`` is the epoch a resumed run starts in, which
    :func:`~alignpipe.trainers.common.train` sets from the checkpoint's ``trainer_state.json``."""

    class Resumable(trainer_class):
        first_epoch = 0

        def _get_train_sampler(self, dataset=None):
            trl_sampler = super()._get_train_sampler(dataset)
            return EpochReplayingRepeatSampler(
                data_source=trl_sampler.data_source, mini_repeat_count=trl_sampler.mini_repeat_count,
                batch_size=trl_sampler.batch_size, repeat_count=trl_sampler.repeat_count,
                shuffle=trl_sampler.shuffle, seed=trl_sampler.seed, first_epoch=self.first_epoch)

    Resumable.__name__ = Resumable.__qualname__ = trainer_class.__name__
    return Resumable
