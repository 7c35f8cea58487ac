"""The architectures (models/registry.py). Importing the package fills the registry."""
from models import conv4, maxl_nets, resfc, resnet, vgg  # noqa: F401
from models.registry import create_model, model_settings  # noqa: F401
