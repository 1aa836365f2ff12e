"""The VDM paper's CIFAR-10 setting (Kingma et al. 2021, appendix B / the official config).

Matches the paper: a U-Net of 32 ResNet blocks at a single 32x32 resolution (no down-sampling),
128 channels, attention in the middle block, dropout 0.1, Fourier features of z_t, a learned
continuous-time schedule initialised to gamma in [-13.3, 5], eps-prediction, AdamW
(lr 2e-4, b1 0.9, b2 0.99, weight decay 0.01), EMA 0.9999, batch size 128 (10M steps in the
paper).
Differs: the learned schedule's interior is trained on the variance of the loss (appendix I.2; the
official code does not do this); random horizontal flips are off, as in the paper's likelihood runs;
gradient clipping at 1.0 is ours; steps default to 2M, set `--config.train.steps` for longer.
Needs `jvdm data prepare cifar10` first (it downloads the archive, or `--from` a local copy).
"""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.data.name = "cifar10"
    config.model.channels = 128
    config.model.channel_mult = (1,)
    config.model.num_res_blocks = 32
    config.model.attention_resolutions = ()
    config.model.num_groups = 32
    config.model.dropout = 0.1
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.decay = "constant"
    config.optimizer.ema_decay = 0.9999
    config.train.batch_size = 128
    config.train.steps = 2_000_000
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.checkpoint_every = 5_000
    config.eval.batch_size = 500
    return config
