"""The drift oracle: NumPy mean cosine between two snapshots of the same probe rows."""

import math
import numpy as np


def mean_cosine_drift_oracle(a, b):
  total = 0.0
  for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
    cos = float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y)))
    total += 1.0 - cos
  return total / len(a)
