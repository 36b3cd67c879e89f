"""``python -m aiida_dm21`` is the ``aiida-dm21`` command."""

from .cli import main

if __name__ == '__main__':
    main()
