"""Compute-node runner of one integer-electron reference calculation: ``python -m aiida_dm21.runner.reference``.

No AiiDA import.  Reads ``input.json`` (``symbols``, ``positions`` in Angstrom, ``basis``, ``charge``,
``spin`` = 2S, ``density_method``, ``reference_method``, optional ``user_energy`` in Ha, ``label``),
runs :func:`aiida_dm21.reference.integer.run_integer_system` and writes ``results.json`` and
``arrays.npz``.  On failure ``results.json`` holds ``{"error": {"category", "message"}}`` and the exit
status is 2 (bad input) or 1 (anything else).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

RESULTS_FILE = 'results.json'
ARRAYS_FILE = 'arrays.npz'


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else 'input.json')
    folder = path.parent
    start = time.perf_counter()
    try:
        from aiida_dm21.reference.integer import IntegerSpec, run_integer_system

        data = json.loads(path.read_text())
        atom = '; '.join(
            f'{s} {x:.10f} {y:.10f} {z:.10f}' for s, (x, y, z) in zip(data['symbols'], data['positions'], strict=True)
        )
        spec = IntegerSpec(
            atom=atom,
            basis=data['basis'],
            charge=int(data.get('charge', 0)),
            spin=int(data.get('spin', 0)),
            density_method=data.get('density_method', 'hf'),
            reference_method=data.get('reference_method', 'ccsd(t)'),
            user_energy=data.get('user_energy'),
            label=data.get('label', ''),
        )
        print(
            f'reference calculation {spec.label}: {spec.reference_method} on a {spec.density_method} density',
            flush=True,
        )
        result = run_integer_system(spec)
    except Exception as exc:  # write a categorised error whatever happened
        bad_input = type(exc).__name__ in ('ReferenceInputError', 'KeyError', 'JSONDecodeError')
        category = 'unsupported_input' if bad_input else 'internal_error'
        traceback.print_exc()
        (folder / RESULTS_FILE).write_text(json.dumps({'error': {'category': category, 'message': str(exc)}}))
        return 2 if bad_input else 1
    result.save(folder)
    payload = json.loads((folder / RESULTS_FILE).read_text())
    payload['error'] = None
    payload['wall_s'] = time.perf_counter() - start
    (folder / RESULTS_FILE).write_text(json.dumps(payload, indent=2))
    print(f'E_ref = {result.e_ref:.10f} Ha, E_xc target = {result.e_xc_target:.10f} Ha', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
