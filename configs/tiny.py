"""A tiny configuration for tests and smoke runs (seconds per stage on a CPU): 16 px images,
5 % of the synthetic counts, width-4 networks, 2 teachers, one epoch each.

    python main.py --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    if c.data.name == "spurious_shapes":
        c.data.builder.update(dict(size=0.05, side=16))
    c.data.image_size = 16
    c.data.eval_batch_size = 64
    c.teachers.num = 2
    c.teachers.width = 4
    c.teachers.epochs = 1
    c.teachers.batch_size = 32
    c.dfr.steps = 50
    c.student.width = 4
    c.train.epochs = 2
    c.train.batch_size = 16
    c.train.checkpoint_every = 5
    c.train.log_every = 5
    c.distill.gammas.update(dict(layer3=0.1, pooled=0.5))
    # No pretraining: it would train one more network per run (tests/test_pretrain.py turns it
    # on, with a smaller task).
    c.pretrain.enabled = False
    c.progress = False
    return c
