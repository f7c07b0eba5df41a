# Searched by nnU-Net's trainer lookup through the nnUNet_extTrainer folder list (docs/trainer-discovery.md).
# nnU-Net imports this file under its bare name; re-exporting keeps every class at its real module path
# (nnunet_mamba.trainers.*), so trainers pickle and checkpoints name them consistently.
from nnunet_mamba.trainers import *  # noqa: F401,F403
