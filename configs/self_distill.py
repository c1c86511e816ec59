"""Self-distillation: the student has the teachers' architecture (arch, width and stem),
logits only, AGRE-KD (the paper's ablation of student capacity). On the synthetic preset both
are already ResNet-18 width 8; on Waterbirds and CelebA the student becomes a ResNet-50.

python main.py --config configs/self_distill.py[:waterbirds|:celeba|:cmnist]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.student.arch = c.teachers.arch
    c.student.width = c.teachers.width
    c.student.small_input = c.teachers.small_input
    return c
