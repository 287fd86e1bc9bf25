"""Build script of mmtransnext: the Python package plus the compiled op ``mmtransnext._C``.

The extension always carries the CPU kernels (``csrc/sliding_window.cpp`` and
``csrc/cpu/*.cpp``); the CUDA kernels (``csrc/cuda/*.cu``) are added when a CUDA
PyTorch sees a GPU and CUDA_HOME is set, or when ``FORCE_CUDA=1``. A CUDA build without
a visible GPU (a cluster's login node) targets ``TORCH_CUDA_ARCH_LIST``, by default
sm_70 to sm_90 (those the CUDA toolkit still supports), and prints the list.

PyTorch must be importable while building (``pip install --no-build-isolation .``), and
the op is compiled against that torch, with the C++ standard its headers need. torch is
deliberately not in ``install_requires``: pip would otherwise be free to replace a
user's CUDA build of torch with another one.

The configs are shipped as package data under ``mmtransnext/.mim/configs`` (the
OpenMMLab layout); ``mmtransnext.get_config_path('detection/....py')`` finds them.
"""
import glob
import os
import re
import shutil
import subprocess
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version_module():
    """The names of ``mmtransnext/version.py`` (read by path: the package itself imports
    mmengine and the compiled op, neither of which a build may need)."""
    names = {}
    with open(os.path.join(HERE, 'mmtransnext', 'version.py'), encoding='utf-8') as f:
        exec(compile(f.read(), f.name, 'exec'), names)
    return names


VERSION = read_version_module()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise RuntimeError(
        'mmtransnext: building the compiled op mmtransnext._C needs PyTorch importable '
        f'in this Python ({exc}). Install torch first (e.g. `pip install torch`), then '
        'run `pip install --no-build-isolation -e .` so the build sees it.') from exc


def check_torch_version():
    """Refuse a torch older than the supported range (its headers lack APIs the op
    uses); build with a warning against a newer one."""
    message = VERSION['unsupported_torch_message'](torch.__version__)
    if message is None:
        return
    if VERSION['torch_release'](torch.__version__) < VERSION['TORCH_MIN']:
        raise RuntimeError(f'{message}. Install a torch in that range first.')
    warnings.warn(f'{message}; building anyway, untested.')


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def want_cuda():
    if os.environ.get('FORCE_CUDA', '0') == '1':
        return True
    return bool(torch.cuda.is_available() and CUDA_HOME is not None)


# Data-centre and workstation GPUs from V100 (sm_70) to H100 (sm_90).
DEFAULT_CUDA_ARCHS = ('7.0', '7.5', '8.0', '8.6', '8.9', '9.0')


def nvcc_release():
    """(major, minor) of CUDA_HOME's nvcc."""
    out = subprocess.run([os.path.join(CUDA_HOME, 'bin', 'nvcc'), '--version'],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r'release (\d+)\.(\d+)', out)
    if match is None:
        raise RuntimeError(f'mmtransnext: cannot read the CUDA version from nvcc:\n{out}')
    return int(match.group(1)), int(match.group(2))


def select_cuda_archs():
    """Fill TORCH_CUDA_ARCH_LIST when building CUDA kernels without a visible GPU.

    torch would otherwise pick the architectures of the visible GPUs, or, with none
    visible, every architecture its own build supports. The user's own list always
    wins; CUDA 13 dropped sm_70, so it is left out there.
    """
    if os.environ.get('TORCH_CUDA_ARCH_LIST'):
        print('mmtransnext: building CUDA kernels for TORCH_CUDA_ARCH_LIST='
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} (set by the environment)")
        return
    if torch.cuda.is_available():
        print('mmtransnext: building CUDA kernels for the visible GPUs')
        return
    cuda = nvcc_release()
    archs = [a for a in DEFAULT_CUDA_ARCHS if cuda < (13, 0) or a != '7.0']
    dropped = '' if len(archs) == len(DEFAULT_CUDA_ARCHS) else '; CUDA 13 has no sm_70'
    os.environ['TORCH_CUDA_ARCH_LIST'] = ';'.join(archs)
    print('mmtransnext: no GPU visible; building CUDA kernels for '
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
          f'(CUDA {cuda[0]}.{cuda[1]}{dropped}; set TORCH_CUDA_ARCH_LIST to choose others)')


def torch_cxx_runtime():
    """The shared C++ runtime (``libstdc++.so``) that torch loaded into this process,
    or None (not Linux, or torch runs on another runtime)."""
    try:
        with open('/proc/self/maps') as maps:
            paths = {line.split()[-1] for line in maps if 'libstdc++.so' in line}
    except OSError:
        return None
    return sorted(paths)[0] if paths else None


def make_extension():
    sources = rel([os.path.join(HERE, 'csrc', 'sliding_window.cpp')] +
                  glob.glob(os.path.join(HERE, 'csrc', 'cpu', '*.cpp')))
    # Headers too, so that an edit of one rebuilds the extension without ninja.
    headers = rel(glob.glob(os.path.join(HERE, 'csrc', '*.h')) +
                  glob.glob(os.path.join(HERE, 'csrc', '*', '*.h')))
    std = '-std=' + VERSION['cxx_standard'](torch.__version__)
    cxx_flags = ['-O3', '-fopenmp', std]
    link_flags = ['-fopenmp']  # pulls in libgomp, which at::parallel_for then uses
    # The op's argument checks throw C++ exceptions that torch's dispatcher catches, so
    # both must use one C++ runtime. A compiler that links its own libstdc++ statically
    # (seen: a toolchain under /opt/gcc named by CXX) gives the op a private copy, and
    # every failing check then crashed the process. Naming torch's shared runtime
    # before the compiler's implicit -lstdc++ resolves the runtime from it.
    runtime = torch_cxx_runtime()
    if runtime:
        link_flags.append(runtime)
    if want_cuda():
        if CUDA_HOME is None:
            raise RuntimeError(
                'mmtransnext: FORCE_CUDA=1 but no CUDA toolkit was found (CUDA_HOME is '
                'unset and nvcc is not on PATH); install the toolkit or unset FORCE_CUDA.')
        select_cuda_archs()
        sources += rel(glob.glob(os.path.join(HERE, 'csrc', 'cuda', '*.cu')))
        return CUDAExtension(
            'mmtransnext._C', sources,
            extra_compile_args={'cxx': cxx_flags,
                                'nvcc': ['-O3', '--use_fast_math', std]},
            extra_link_args=link_flags, depends=headers)
    return CppExtension('mmtransnext._C', sources, depends=headers,
                        extra_compile_args={'cxx': cxx_flags}, extra_link_args=link_flags)


# Loads the built library alone and makes one failing argument check: it must raise.
_SELF_TEST = '''import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.mmtransnext.sliding_window_aggregate(
        torch.ones(1, 1, 4, 1), torch.ones(1, 1, 4, 1), 2, 2, 2)
except RuntimeError:
    sys.exit(0)
sys.exit(3)
'''


class BuildWithHint(BuildExtension):
    """BuildExtension that says what is missing when compiling the op fails, and
    refuses a library whose argument checks do not reach Python as exceptions."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as exc:
            raise RuntimeError(
                'mmtransnext: compiling the extension mmtransnext._C failed '
                f'({type(exc).__name__}: {exc}). It needs a compiler with OpenMP '
                f'(`-fopenmp`) for {VERSION["cxx_standard"](torch.__version__)} (g++ >= 10 '
                'for C++20), the headers of the installed torch '
                f'{torch.__version__}, and for CUDA builds nvcc matching that torch '
                '(see the compiler output above).'
            ) from exc
        for ext in self.extensions:
            self.check_errors_raise(self.get_ext_fullpath(ext.name))

    def check_errors_raise(self, library):
        """Fail the build if a bad call into ``library`` does not raise RuntimeError."""
        import sys
        run = subprocess.run([sys.executable, '-c', _SELF_TEST, library],
                             capture_output=True, text=True)
        if run.returncode == 0:
            return
        if run.returncode < 0:
            outcome = f'ended the process with signal {-run.returncode}'
        else:
            outcome = f'did not raise RuntimeError (exit {run.returncode}: {run.stderr[-500:]})'
        compiler = os.environ.get('CXX', 'c++')
        raise RuntimeError(
            f'mmtransnext: the built library {library} {outcome} on a failing argument '
            f'check, so every bad call would crash Python. It was built with {compiler} '
            f'(CXX) for torch {torch.__version__}, which was built with '
            f'{torch_compiler()}. This happens when the compiler brings its own C++ '
            'runtime (libstdc++ linked statically) that torch\'s cannot catch '
            'exceptions from; build with the compiler torch was built with, e.g. '
            '`CXX=g++ CC=gcc pip install --no-build-isolation .`.')


def torch_compiler():
    """'GCC 13.3' or the like, from torch's build configuration."""
    found = re.search(r'^\s*-\s*(GCC [\d.]+|clang [\d.]+)', torch.__config__.show(), re.M)
    return found.group(1) if found else 'an unknown compiler'


class BuildPyWithConfigs(build_py):
    """build_py that ships ``configs/`` as ``mmtransnext/.mim/configs`` in the build
    (the source tree keeps one copy; an editable install reads ``configs/`` itself)."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        target = os.path.join(self.build_lib, 'mmtransnext', '.mim', 'configs')
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, 'configs'), target,
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))



check_torch_version()
setup(
    name='mmtransnext',
    version=VERSION['__version__'],
    description='TransNeXt vision backbone as an OpenMMLab plugin',
    license='Apache-2.0',
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Programming Language :: C++',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    packages=find_packages(include=['mmtransnext*']),
    python_requires='>=3.9',
    # What `import mmtransnext` needs besides torch; mmdet and mmseg are what the
    # backbone plugs into, so they stay the user's choice (extras below).
    install_requires=['numpy', 'mmengine>=0.10.0', 'mmcv>=2.0.0,<2.2.0'],
    extras_require={
        'det': ['mmdet>=3.3.0,<3.4'],
        'seg': ['mmsegmentation>=1.2.2,<1.3', 'ftfy', 'regex'],
    },
    ext_modules=[make_extension()],
    cmdclass={'build_ext': BuildWithHint, 'build_py': BuildPyWithConfigs},
    zip_safe=False,
)
