"""The BN-free float64 setting shared by the distributed meta-gradient test and its worker."""
import torch

from models import create_model


def batch_and_nets():
    torch.manual_seed(0)
    args = dict(backbone="vgg16", width_mult=1 / 32, batch_norm=False)
    model = create_model("multitask", classes=[3, 7], **args).double()
    generator = create_model("label_generator", psi=[2, 3, 2], **args).double()
    x = torch.randn(12, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2])
    return model, generator, x, y
