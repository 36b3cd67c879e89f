"""The DM21 architecture's description without PyTorch: the input features and the hyper-parameters.

:mod:`aiida_dm21.functional.model` builds the network from a :class:`DM21Config`; this module only needs the
standard library, so the checkpoint format (:mod:`aiida_dm21.functional.checkpoint_format`) and the AiiDA plugins
can check an architecture without importing PyTorch.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ['FEATURE_NAMES', 'DM21Config']

#: Order of the 11 input features of the network.
FEATURE_NAMES: tuple[str, ...] = (
    'rho_a',
    'rho_b',
    'norm_grad_rho',
    'norm_grad_rho_a',
    'norm_grad_rho_b',
    'tau_a',
    'tau_b',
    'hfx_a_omega0',
    'hfx_a_omega0.4',
    'hfx_b_omega0',
    'hfx_b_omega0.4',
)


@dataclasses.dataclass(frozen=True)
class DM21Config:
    """Hyper-parameters of the DM21 architecture (the published functionals all use the defaults)."""

    n_features: int = 11
    hidden: int = 256
    n_blocks: int = 6
    n_outputs: int = 3
    layer_norm_eps: float = 1e-5
    log_offset: float = 1e-4
    abs_offset: float = 1e-9
    omegas: tuple[float, ...] = (0.0, 0.4)

    def __post_init__(self) -> None:
        """Refuse a configuration no network can be built or evaluated with (naming the key and the range)."""
        fixed = {'n_features': len(FEATURE_NAMES), 'n_outputs': 3}
        for key, value in fixed.items():
            if type(getattr(self, key)) is not int or getattr(self, key) != value:
                raise ValueError(
                    f'architecture `{key}` must be {value} (the DM21 features and enhancement factors), '
                    f'got {getattr(self, key)!r}'
                )
        for key in ('hidden', 'n_blocks'):
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise ValueError(f'architecture `{key}` must be an integer >= 1, got {value!r}')
        for key in ('layer_norm_eps', 'log_offset', 'abs_offset'):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f'architecture `{key}` must be a finite number >= 0, got {value!r}')
        if self.layer_norm_eps <= 0 or self.log_offset + self.abs_offset <= 0:
            raise ValueError(
                'architecture `layer_norm_eps` and `log_offset` + `abs_offset` must be > 0 '
                f'(got {self.layer_norm_eps!r} and {self.log_offset + self.abs_offset!r}): the network divides by '
                'them and takes the logarithm of |x| + offset'
            )
        omegas = self.omegas
        if (
            not isinstance(omegas, tuple)
            or len(omegas) != 2
            or not all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in omegas)
        ):
            raise ValueError(
                f'architecture `omegas` must be two finite range-separation parameters >= 0 (the features '
                f'{FEATURE_NAMES[7]} ... {FEATURE_NAMES[10]}), got {omegas!r}'
            )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data['omegas'] = list(self.omegas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DM21Config:
        """The configuration of a checkpoint's ``architecture`` metadata.

        :raises TypeError: ``data`` is not a mapping.
        :raises ValueError: unknown keys, or values no network can be built with.
        """
        if not isinstance(data, dict):
            raise TypeError(f'the architecture must be a mapping of hyper-parameters, got {type(data).__name__}')
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f'unknown DM21 architecture keys: {sorted(unknown)}')
        values = dict(data)
        if 'omegas' in values:
            omegas = values['omegas']
            if isinstance(omegas, (str, bytes)) or not isinstance(omegas, (list, tuple)):
                raise ValueError(f'architecture `omegas` must be a list of numbers, got {omegas!r}')
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in omegas):
                raise ValueError(f'architecture `omegas` must be a list of numbers, got {omegas!r}')
            values['omegas'] = tuple(float(w) for w in omegas)
        return cls(**values)
