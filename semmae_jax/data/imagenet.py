"""ImageNet's per-channel mean and std (RGB, on [0, 1] pixels): every model here, as MAE's and
SemMAE's, sees images normalised by them; the input pipeline applies them, pictures undo them.

The host pipeline computes its constants from the decimal values (float64, then cast), the
device-side normalisation and the pictures use the float32 arrays: one set of constants, in
the precision of the arithmetic each side runs."""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_F32 = np.asarray(IMAGENET_MEAN, np.float32)
IMAGENET_STD_F32 = np.asarray(IMAGENET_STD, np.float32)
