#!/usr/bin/env python
"""Compile every ``csrc/**/*.cu`` of mmtransnext to object files with nvcc.

A build check for machines without a GPU: it proves the CUDA kernels compile for
sm_80 and sm_90 (one ``-gencode`` per architecture, one nvcc call per file) against the
installed torch's headers, with the flags ``torch.utils.cpp_extension`` would use. The
objects are not linked or loaded.

Usage:
    python tools/compile_cuda.py [--out-dir DIR] [--arch 80 --arch 90] [--nvcc PATH]

Exits 0 when every file compiles; otherwise prints nvcc's message and exits 1
(2 when nvcc or torch is missing).
"""
import argparse
import glob
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# CPU-only torch wheels ship c10/cuda headers but not this CMake-generated one, which in
# CUDA wheels (shared-library builds) holds a single define. Supplied only when absent.
_CMAKE_MACROS = 'c10/cuda/impl/cuda_cmake_macros.h'
_CMAKE_MACROS_TEXT = '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n'


def shim_flags(includes, shim_dir):
    if any(os.path.exists(os.path.join(p, _CMAKE_MACROS)) for p in includes):
        return []
    path = os.path.join(shim_dir, _CMAKE_MACROS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(_CMAKE_MACROS_TEXT)
    return [f'-I{shim_dir}']


def torch_flags(shim_dir):
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        print(f'compile_cuda: torch is not importable ({exc}); it provides the headers',
              file=sys.stderr)
        sys.exit(2)
    includes = cpp_extension.include_paths()  # torch's own include dirs
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [f'-I{p}' for p in includes] + shim_flags(includes, shim_dir)
    flags += [f'-I{sysconfig.get_paths()["include"]}']
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    # The standard setup.py compiles the op with, for this torch.
    cxx_standard = runpy.run_path(os.path.join(ROOT, 'mmtransnext', 'version.py'))['cxx_standard']
    flags += [f'-std={cxx_standard(torch.__version__)}', '-O3', '-Xcompiler', '-fPIC',
              f'-D_GLIBCXX_USE_CXX11_ABI={abi}',
              '-DTORCH_API_INCLUDE_EXTENSION_H', '-DTORCH_EXTENSION_NAME=_C']
    return flags


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', default=None,
                        help='where the .o files go (default: a temporary directory, '
                        'removed afterwards)')
    parser.add_argument('--arch', action='append', default=None,
                        help='compute capability without the dot; repeatable '
                        '(default: 80 and 90)')
    parser.add_argument('--nvcc', default=os.environ.get('NVCC', 'nvcc'))
    args = parser.parse_args(argv)

    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        print(f'compile_cuda: nvcc not found ({args.nvcc!r} is not on PATH)', file=sys.stderr)
        return 2
    sources = sorted(glob.glob(os.path.join(ROOT, 'csrc', '**', '*.cu'), recursive=True))
    if not sources:
        print('compile_cuda: no .cu files under csrc/', file=sys.stderr)
        return 1
    archs = args.arch or ['80', '90']
    gencode = []
    for arch in archs:
        gencode += ['-gencode', f'arch=compute_{arch},code=sm_{arch}']

    tmp = tempfile.TemporaryDirectory(prefix='mmtransnext-cuda-')
    out_dir = args.out_dir or os.path.join(tmp.name, 'obj')
    os.makedirs(out_dir, exist_ok=True)
    failed = 0
    try:
        flags = torch_flags(os.path.join(tmp.name, 'shim'))
        for src in sources:
            rel = os.path.relpath(src, ROOT)
            obj = os.path.join(out_dir, rel.replace(os.sep, '__')[:-3] + '.o')
            cmd = [nvcc, '-c', src, '-o', obj] + gencode + flags
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                failed += 1
                print(f'FAILED {rel} (sm_{", sm_".join(archs)})\n$ {" ".join(cmd)}\n'
                      f'{proc.stdout}{proc.stderr}', file=sys.stderr)
            else:
                size = os.path.getsize(obj)
                print(f'ok {rel} -> {obj} ({size} bytes, sm_{", sm_".join(archs)})')
    finally:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
