"""xasflow.training: labels, features, forests and networks, evaluation, bundle export.

torch's OpenMP workers spin while they wait by default; on a shared 2-core machine that made
two threads 5x slower per epoch than one (6.6 vs 0.9 s), and passive waiting 1.3 s. The
policy is read once, when torch loads, so it is set here, before any module of this package
can import torch (``fit`` reaches torch through ``nn_augment``, before ``nn``); an explicit
setting is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
