"""bfloat16 compute (config `dtype='bfloat16'`): the distillation step computes the networks'
convolutions in bf16 while parameters, optimiser state, BatchNorm statistics, teacher weights
(and the Gram matrices behind them) and losses stay float32, and its losses follow float32's.

50 steps of the real step (`distill.compile_step`) in both dtypes, from the same initial
variables and the same batches, with configs/tiny.py's distillation settings, optimiser, image
size and batch (16 px, batch 16, 2 teachers, gammas layer3 0.1 and pooled 0.5), on tiny
ResNets (one block per stage) as tests/test_distill.py builds them: teachers of width 8 and a
student of width 4, so that adapters map the student's features.

AGRE-KD runs with 10 classes, where its weights come from the per-sample Gram matrices (the
layerwise ones). With two classes they are the closed form's {0, 1, 2} / sum, which flips on
samples where a teacher's and the student's softmax agree to within bf16 rounding: measured,
one step of 50 at 3.1 % from float32's loss (mean 0.2 %); that discreteness is the weighting's,
not a leak.
"""

from __future__ import annotations

import functools

import fakes
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agre_jax import distill, models, optim, settings
from configs import tiny as tiny_config

STEPS = 50
RTOL = 0.02  # bf16 losses within 2 % of float32's at every step


def tiny(num_classes: int, width: int, dtype) -> models.ResNet:
    return models.ResNet(
        stage_sizes=(1, 1, 1, 1),
        block_cls=models.BasicBlock,
        num_classes=num_classes,
        width=width,
        small_input=True,
        dtype=dtype,
    )


def setup(weighting: str, num_classes: int, dtype):
    """The step's static parts (models in `dtype`), its frozen variables and initial state
    (float32 variables, the same for every dtype) and the tiny config's sizes."""
    config = tiny_config.get_config()
    config.distill.weighting = weighting
    cfg = settings.distill_config(config)
    size, batch_size = config.data.image_size, config.train.batch_size
    m = settings.num_teachers(config)
    teacher = tiny(num_classes, 8, dtype)
    as_f32 = teacher.clone(dtype=jnp.float32)  # the same variables (and init) for every dtype
    t_vars = [models.init(as_f32, jax.random.key(100 + t), size) for t in range(m)]
    head = jax.tree.map(lambda x: -x, t_vars[0]["params"]["fc"])  # opposite of teacher 0's
    frozen = {"teachers": (distill.stack_variables(t_vars),), "biased": head}
    ens = distill.Ensemble(teachers=(teacher,), group_sizes=(m,), biased_backbone=(0, 0))
    mdl = distill.create_models(tiny(num_classes, 4, dtype), ens, cfg)
    o = config.train.optimizer
    tx = optim.create_optimizer(
        o.name,
        o.learning_rate,
        STEPS,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        schedule=o.schedule,
    )
    return mdl, cfg, tx, frozen, size, batch_size


def distill_run(mdl, cfg, tx, frozen, state, size, batch_size, num_classes):
    """STEPS steps of the jitted step from `state` (not consumed); returns (losses [STEPS],
    final state, last metrics)."""
    step = distill.compile_step(mdl, cfg, tx, pmap=False)
    state = jax.tree.map(jnp.copy, state)  # the step donates its input state
    losses = []
    for i in range(STEPS):
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(7), i))
        batch = {
            "image": jax.random.normal(k1, (batch_size, size, size, 3)),
            "label": jax.random.randint(k2, (batch_size,), 0, num_classes),
        }
        state, metrics = step(state, frozen, batch, jax.random.fold_in(jax.random.key(3), i))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, metrics


@functools.cache
def runs(weighting: str, num_classes: int):
    """((losses, state, metrics, student model) in float32, the same in bf16), from one
    initial state."""
    out, state = [], None
    for dtype in (jnp.float32, jnp.bfloat16):
        mdl, cfg, tx, frozen, size, batch_size = setup(weighting, num_classes, dtype)
        if state is None:  # float32 models: the variables every dtype starts from
            state = distill.create_train_state(mdl, tx, jax.random.key(0), size)
        result = distill_run(mdl, cfg, tx, frozen, state, size, batch_size, num_classes)
        out.append((*result, mdl.student))
    return tuple(out)


def _float_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("weighting, num_classes", [("aver", 2), ("agre", 10)])
def test_bf16_losses_follow_float32_and_state_stays_float32(weighting, num_classes):
    (l32, s32, m32, _), (l16, s16, m16, student16) = runs(weighting, num_classes)
    rel = np.abs(l16 - l32) / np.abs(l32)
    print(
        f"\n{weighting}, {num_classes} classes: loss {l32[0]:.4f} -> {l32[-1]:.4f} (float32); "
        f"bf16 relative difference max {rel.max():.2e} (step {rel.argmax()}), "
        f"mean {rel.mean():.2e}"
    )
    assert np.isfinite(l32).all() and np.isfinite(l16).all()
    assert rel.max() <= RTOL, f"step {rel.argmax()}: {l16[rel.argmax()]} vs {l32[rel.argmax()]}"
    # The bf16 run computed in bf16 (not float32 twice): its features are bf16, its losses
    # not bitwise float32's.
    _, feats = jax.eval_shape(
        functools.partial(models.apply_with_features, student16, layers=("layer3", "pooled")),
        {"params": s16.params["student"], "batch_stats": s16.batch_stats},
        jnp.zeros((1, 16, 16, 3)),
    )
    assert {f.dtype for f in feats.values()} == {jnp.dtype(jnp.bfloat16)}
    assert not np.array_equal(l16, l32)
    # What is kept and what is weighed is float32: parameters (student and adapters),
    # optimiser state, BatchNorm statistics, the teacher weights and every loss and metric.
    assert s16.params["adapters"], "the test needs adapters (teachers wider than the student)"
    for tree in (s16.params, s16.opt_state, s16.batch_stats):
        assert _float_dtypes(tree) == {jnp.dtype(jnp.float32)}
    assert jax.tree.map(lambda x: x.dtype, s16.params) == jax.tree.map(
        lambda x: x.dtype, s32.params
    )
    assert set(m16) == set(m32)
    assert {k for k in m16 if k.startswith("weight/")}, "no teacher weights in the metrics"
    assert {v.dtype for v in m16.values()} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------- dtype='auto'


def test_auto_dtype_is_resolved_once_into_the_name_runs_are_identified_by(tmp_path):
    """'auto' is bfloat16 on a GPU / TPU backend and float32 on the CPU, resolved into the
    config (settings.resolve_dtype, as main.py and launch.run_one do): an 'auto' run on this
    CPU has a float32 run's stage keys and resumes its workdir, and the other way round."""
    from agre_jax import stages, workdir
    from configs import default

    assert [settings.dtype_name("auto", b) for b in ("cpu", "gpu", "tpu")] == [
        "float32",
        "bfloat16",
        "bfloat16",
    ]
    assert settings.dtype("auto") == jnp.float32  # this CPU
    # The 224 px presets ask for 'auto'; the CPU-sized ones stay float32.
    assert {p: default.get_config(p).dtype for p in default.DATASETS} == {
        "synthetic": "float32",
        "waterbirds": "auto",
        "celeba": "auto",
        "cmnist": "float32",
    }
    f32 = tiny_config.get_config()
    auto = tiny_config.get_config()
    auto.dtype = "auto"
    settings.validate(auto)  # a valid name
    resolved = settings.resolve_dtype(auto)
    assert resolved.dtype == "float32" and auto.dtype == "auto"  # a copy
    assert settings.resolve_dtype(f32) is f32
    assert settings.resolve_dtype(auto, backend="gpu").dtype == "bfloat16"
    data, pdata = fakes.dataset_keys(), fakes.dataset_keys("the-pretraining-data")
    assert stages.stage_keys(resolved, data) == stages.stage_keys(f32, data)
    assert stages.pretrain_keys(resolved, pdata) == stages.pretrain_keys(f32, pdata)
    gpu = settings.resolve_dtype(auto, backend="gpu")
    assert stages.stage_keys(gpu, data).teachers != stages.stage_keys(f32, data).teachers
    # Workdirs: float32 then 'auto', 'auto' then float32: the same run; bf16 is another.
    for first, second in ((f32, resolved), (resolved, f32)):
        run = tmp_path / f"{first is f32}"
        workdir.prepare(run, first, overwrite=False)
        workdir.prepare(run, second, overwrite=False)
    with pytest.raises(workdir.ConfigMismatchError, match="dtype"):
        workdir.prepare(tmp_path / "True", gpu, overwrite=False)
    # A sweep compares its runs' unresolved configs with recorded ones (resolved in the jobs).
    recorded = workdir.config_dict(resolved)
    assert workdir.config_differences(recorded, workdir.config_dict(auto)) == []
    assert workdir.config_differences(workdir.config_dict(gpu), workdir.config_dict(auto)) == []
    assert workdir.config_differences(recorded, workdir.config_dict(gpu)) == ["dtype"]
