"""aiida-dm21: train, run and trace DM21-style neural exchange-correlation functionals (PyTorch + PySCF + AiiDA).

The numerical core (``aiida_dm21.functional``) never imports AiiDA.  PySCF-like entry points::

    from pyscf import gto
    import aiida_dm21
    mol = gto.M(atom='O 0 0 0.1178; H 0 0.7555 -0.4712; H 0 -0.7555 -0.4712', basis='cc-pvdz')
    mf = aiida_dm21.KS(mol, 'DM21')
    mf.kernel()
"""

__version__ = '0.1.0'

__all__ = ['KS', 'RKS', 'ROKS', 'UKS', '__version__']


def __getattr__(name):
    if name in ('KS', 'RKS', 'UKS', 'ROKS'):
        from .functional import scf

        return getattr(scf, name)
    raise AttributeError(name)
