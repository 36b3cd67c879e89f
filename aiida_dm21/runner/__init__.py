"""What runs on the compute node (``python -m aiida_dm21.runner.scf input.json``).

Only PySCF, PyTorch and the numerical core: nothing here may import AiiDA.
"""
