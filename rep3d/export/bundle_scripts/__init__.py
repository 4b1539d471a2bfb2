"""Sources that :mod:`rep3d.export.bundle` copies into a MONAI bundle's ``scripts/`` folder.

They run inside the bundle, with only MONAI, PyTorch and the standard library (this repository is not
on the path there), so they import nothing of Rep3D. Nothing in ``rep3d`` imports them:

* ``datalist.py``: the cases of ``--dataset_dir`` (one file per case, or nnU-Net channel files
  ``<case>_0000``, ``<case>_0001``, ... grouped per case) and the output names ``<case>_seg``.
* ``ensemble.py``: the fold ensemble (softmax probabilities of every fold averaged) and its
  sliding-window inferer, for bundles exported from a cross-validation folder.
"""
