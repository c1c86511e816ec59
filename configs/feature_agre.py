"""The plan's configuration C (gammas 0.05 / 0.1 / 0.25 on layer2 / layer3 / layer4, MSE through
1x1-conv adapters) with per-layer AGRE weights of the feature targets (the plan's section 9.3):
for each layer and sample, W_t = 1 - cos of the student gradients of the feature loss towards
teacher t's features and towards the biased model's, normalised over teachers (exact, from the
per-sample Gram of those gradients; weighting.feature_agre_weights). The KD keeps AGRE-KD's
own weights.

With the default biased model (an ERM head on teacher 0's backbone, under its DFR head) the
biased model's features are teacher 0's, so teacher 0 gets feature weight 0 at every layer.

    python main.py --config configs/feature_agre.py
"""

from configs import multilayer_c


def get_config(arg=None):
    c = multilayer_c.get_config(arg)
    c.distill.feature_weighting = "agre"
    return c
