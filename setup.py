"""Build script of mmtransnext: the Python package plus the compiled op ``mmtransnext._C``.

The extension always carries the CPU kernels (``csrc/sliding_window.cpp`` and
``csrc/cpu/*.cpp``); the CUDA kernels (``csrc/cuda/*.cu``) are added when a CUDA
PyTorch sees a GPU and CUDA_HOME is set, or when ``FORCE_CUDA=1``. PyTorch must be
importable while building (``pip install --no-build-isolation -e .``); it is not listed
in ``install_requires`` because the Makefile installs it first (and a user's own CUDA
build must not be replaced).
"""
import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise RuntimeError(
        'mmtransnext: building the compiled op mmtransnext._C needs PyTorch importable '
        f'in this Python ({exc}). Install torch first (e.g. `pip install torch`), then '
        'run `pip install --no-build-isolation -e .` so the build sees it.') from exc


def read_version():
    with open(os.path.join(HERE, 'mmtransnext', 'version.py'), encoding='utf-8') as f:
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read())
    if match is None:
        raise RuntimeError('mmtransnext/version.py does not define __version__')
    return match.group(1)


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def want_cuda():
    if os.environ.get('FORCE_CUDA', '0') == '1':
        return True
    return bool(torch.cuda.is_available() and CUDA_HOME is not None)


def make_extension():
    sources = rel([os.path.join(HERE, 'csrc', 'sliding_window.cpp')] +
                  glob.glob(os.path.join(HERE, 'csrc', 'cpu', '*.cpp')))
    cxx_flags = ['-O3', '-fopenmp']
    link_flags = ['-fopenmp']  # pulls in libgomp, which at::parallel_for then uses
    if want_cuda():
        if CUDA_HOME is None:
            raise RuntimeError(
                'mmtransnext: FORCE_CUDA=1 but no CUDA toolkit was found (CUDA_HOME is '
                'unset and nvcc is not on PATH); install the toolkit or unset FORCE_CUDA.')
        sources += rel(glob.glob(os.path.join(HERE, 'csrc', 'cuda', '*.cu')))
        return CUDAExtension(
            'mmtransnext._C', sources,
            extra_compile_args={'cxx': cxx_flags, 'nvcc': ['-O3', '--use_fast_math']},
            extra_link_args=link_flags)
    return CppExtension('mmtransnext._C', sources,
                        extra_compile_args={'cxx': cxx_flags}, extra_link_args=link_flags)


class BuildWithHint(BuildExtension):
    """BuildExtension that says what is missing when compiling the op fails."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as exc:
            raise RuntimeError(
                'mmtransnext: compiling the extension mmtransnext._C failed '
                f'({type(exc).__name__}: {exc}). It needs a C++20 compiler with OpenMP '
                '(g++ >= 10, `-fopenmp`), the headers of the installed torch '
                f'{torch.__version__}, and for CUDA builds nvcc matching that torch '
                '(see the compiler output above).'
            ) from exc


setup(
    name='mmtransnext',
    version=read_version(),
    description='TransNeXt vision backbone as an OpenMMLab plugin',
    packages=find_packages(include=['mmtransnext*']),
    python_requires='>=3.8',
    install_requires=[],
    ext_modules=[make_extension()],
    cmdclass={'build_ext': BuildWithHint},
    zip_safe=False,
)
