#!/usr/bin/env python
"""Compile every ``csrc/**/*.cu`` of mmtransnext to object files with nvcc.

A build check for machines without a GPU: it proves the CUDA kernels compile for
sm_80 and sm_90 (one ``-gencode`` per architecture, one nvcc call per file) against the
installed torch's headers, with the flags ``setup.py`` builds them with. The objects
are not linked or loaded.

``--resources`` also prints, per kernel and architecture, what its machine code needs
(read with ``cuobjdump``, the one Triton ships or one on PATH): registers and stack
bytes per thread, SASS instructions, subroutines (``RET``: the integer division
routines of a runtime ``/`` or ``%``, among others; a ``CALL`` alone may also be the
compiler's reconvergence idiom, so calls are not counted) and global loads.

Usage:
    python tools/compile_cuda.py [--out-dir DIR] [--arch 80 --arch 90] [--nvcc PATH]
        [--resources]

Exits 0 when every file compiles; otherwise prints nvcc's message and exits 1
(2 when nvcc or torch is missing).
"""
import argparse
import glob
import os
import re
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
    flags += [f'-std={cxx_standard(torch.__version__)}', '-O3', '--use_fast_math',
              '-Xcompiler', '-fPIC',
              f'-D_GLIBCXX_USE_CXX11_ABI={abi}',
              '-DTORCH_API_INCLUDE_EXTENSION_H', '-DTORCH_EXTENSION_NAME=_C']
    return flags


def _cuobjdump():
    try:
        import triton.backends.nvidia
        bundled = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), 'bin',
                               'cuobjdump')
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return shutil.which('cuobjdump')


def _short_name(mangled):
    """``for_each_element<DotElement<BFloat16, 8>>`` from a kernel's mangled name."""
    name = subprocess.run(['c++filt', mangled], capture_output=True, text=True).stdout.strip()
    for scope in ('mmtransnext::', '(anonymous namespace)::', 'window::', 'c10::'):
        name = name.replace(scope, '')
    name = name.split('(')[0]
    return re.sub(r'^void ', '', name).replace(' >', '>') or mangled


def machine_code_table(objects, tool):
    """A markdown table of each kernel's resources in the given objects, per arch."""
    rows = []
    for obj in objects:
        usage = subprocess.run([tool, '-res-usage', obj], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, '-sass', obj], capture_output=True, text=True,
                              check=True).stdout
        code = {}   # (arch, mangled) -> SASS text
        for arch_block in re.split(r'\n(?=\s*arch = sm_)', sass):
            arch = re.search(r'arch = (sm_\d+)', arch_block)
            for function in re.split(r'\n\s+Function : ', arch_block)[1:]:
                mangled, body = function.split('\n', 1)
                code[(arch.group(1) if arch else '?', mangled.strip())] = body
        arch = '?'
        for line in usage.splitlines():
            arch_match = re.search(r'arch = (sm_\d+)', line)
            if arch_match:
                arch = arch_match.group(1)
            function = re.match(r'\s*Function (\S+):', line)
            if function:
                current = function.group(1)
            resources = re.search(r'REG:(\d+) STACK:(\d+)', line)
            if resources:
                body = code.get((arch, current), '')
                ops = re.findall(r'/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)', body)
                rows.append((_short_name(current), arch, int(resources.group(1)),
                             int(resources.group(2)), sum(op != 'NOP' for op in ops),
                             sum(op.startswith('RET') for op in ops),
                             sum(op.startswith('LDG') for op in ops)))
    lines = ['| kernel | arch | registers | stack B | instructions | subroutines | LDG |',
             '|---|---|---|---|---|---|---|']
    lines += [f'| `{k}` | {a} | {r} | {st} | {n} | {c} | {ld} |'
              for k, a, r, st, n, c, ld in sorted(rows)]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', default=None,
                        help='where the .o files go (default: a temporary directory, '
                        'removed afterwards)')
    parser.add_argument('--arch', action='append', default=None,
                        help='compute capability without the dot; repeatable '
                        '(default: 80 and 90)')
    parser.add_argument('--nvcc', default=os.environ.get('NVCC', 'nvcc'))
    parser.add_argument('--resources', action='store_true',
                        help='print each kernel\'s registers, stack, instructions, '
                        'subroutines and global loads per architecture (needs cuobjdump)')
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
    objects = []
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
                objects.append(obj)
                print(f'ok {rel} -> {obj} ({size} bytes, sm_{", sm_".join(archs)})')
        if args.resources and not failed:
            tool = _cuobjdump()
            if tool is None:
                print('compile_cuda: --resources needs cuobjdump (Triton ships one)',
                      file=sys.stderr)
                return 2
            print(machine_code_table(objects, tool))
    finally:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
