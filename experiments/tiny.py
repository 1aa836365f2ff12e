"""A model that trains in seconds on a CPU, for tests and smoke runs."""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.model.channels = 8
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (14,)
    config.model.num_groups = 4
    config.gamma.hidden = 16
    config.optimizer.warmup_steps = 2
    config.train.batch_size = 8
    config.train.steps = 4
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.checkpoint_every = 2
    config.train.variance_every = 0  # no loss-variance measurements (tests turn them on)
    config.eval.batch_size = 100
    config.eval.num_samples = 4
    config.eval.sample_steps = 4
    config.eval.final_draws = 1
    return config
