"""Contrastive representation distillation (CRD, Tian et al. 2020) on the pooled features,
gamma 0.5, beside AGRE-KD's weighted KD: student and per-teacher embedding heads (d = 128),
InfoNCE in both directions at temperature 0.07 with in-batch negatives (no memory bank), the
teachers' normalised embeddings combined with the per-sample teacher weights.

    python main.py --config configs/crd.py
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.feature_loss = "crd"
    c.distill.gammas.pooled = 0.5
    return c
