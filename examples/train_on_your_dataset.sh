#!/usr/bin/env bash
# A full nnU-Net workflow with a plugin trainer on your own dataset (nnU-Net raw format, DatasetXXX_Name).
# Usage: bash examples/train_on_your_dataset.sh DATASET_ID [TRAINER] [CONFIG]
# Needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results set, as for any nnU-Net run.
set -euo pipefail
D=${1:?dataset id}
TR=${2:-nnUNetTrainerLightMUNet}
C=${3:-3d_fullres}
nnUNetv2_plan_and_preprocess -d "$D" -c "$C" --verify_dataset_integrity
nnunet-mamba benchmark cost -d "$D" -c "$C" -tr "$TR" nnUNetTrainer -o "results/D${D}_${C}_cost"   # cost beside nnU-Net
# NNUNET_MAMBA_CUDA_GRAPHS=1 replays the network's captured training step: 13-46 % shorter steps on an H200
# (docs/benchmarking.md, "CUDA graphs"); one GPU
GRAPHS=1; command -v nvidia-smi > /dev/null || GRAPHS=0
for FOLD in 0 1 2 3 4; do
  NNUNET_MAMBA_CUDA_GRAPHS=$GRAPHS nnUNetv2_train "$D" "$C" "$FOLD" -tr "$TR" --npz
done
nnUNetv2_find_best_configuration "$D" -c "$C" -tr "$TR"
echo "Predict with: nnUNetv2_predict -i IMAGES -o OUT -d $D -c $C -tr $TR"
