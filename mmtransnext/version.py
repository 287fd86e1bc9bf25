"""Version of mmtransnext and the torch versions it supports.

This module imports nothing beyond the standard library, so ``setup.py`` and
``tools/compile_cuda.py`` read it (by path) before the package can be imported.
"""
import re
from typing import Optional, Tuple

__version__ = '0.1.0'

#: Oldest and newest torch (major, minor) this release is built and tested with.
TORCH_MIN = (2, 1)
TORCH_MAX = (2, 13)
#: The range in words, for messages and the README.
SUPPORTED_TORCH = f'torch {TORCH_MIN[0]}.{TORCH_MIN[1]} to {TORCH_MAX[0]}.{TORCH_MAX[1]}'


def torch_release(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a torch version string.

    Args:
        version (str): e.g. ``'2.1.2+cu121'``, ``'2.13.0'`` or ``'2.14.0a0+git1234'``.

    Returns:
        tuple[int, int]: e.g. ``(2, 1)``.

    Raises:
        ValueError: If the string does not start with ``MAJOR.MINOR``.
    """
    match = re.match(r'(\d+)\.(\d+)', version)
    if match is None:
        raise ValueError(f'cannot read a torch version from {version!r}')
    return int(match.group(1)), int(match.group(2))


def unsupported_torch_message(version: str) -> Optional[str]:
    """Why a torch version is outside the supported range, or None inside it.

    Args:
        version (str): ``torch.__version__``.

    Returns:
        str | None: A message naming the supported range, None when supported.
    """
    release = torch_release(version)
    if TORCH_MIN <= release <= TORCH_MAX:
        return None
    side = 'older' if release < TORCH_MIN else 'newer'
    return (f'mmtransnext {__version__} supports {SUPPORTED_TORCH}; the installed torch '
            f'{version} is {side} than that range')


def cxx_standard(version: str) -> str:
    """The C++ standard torch's headers are compiled with, as a ``-std=`` value.

    torch 2.13's headers require C++20; earlier torches build their own extensions with
    C++17. The compiled op (host and nvcc alike) and ``tools/compile_cuda.py`` both use
    this.

    Args:
        version (str): ``torch.__version__``.

    Returns:
        str: ``'c++20'`` or ``'c++17'``.
    """
    return 'c++20' if torch_release(version) >= (2, 13) else 'c++17'
