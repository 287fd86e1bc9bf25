"""One step under ``torch.profiler`` as the benchmark tools print it; its operators counted."""


def profile_table(step, cuda: bool, top: int) -> str:
    """The ``top`` operators and kernels of one ``step()`` by self time, as a table.

    Args:
        step (Callable[[], None]): one run of the workload (already warmed up).
        cuda (bool): also record CUDA kernels, sorted by their device time.
        top (int): rows to keep.

    Returns:
        str: ``torch.profiler``'s key-averages table.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    if not cuda:
        key = 'self_cpu_time_total'
    else:   # torch 2.4 renamed the CUDA columns
        key = ('self_device_time_total' if hasattr(averages[0], 'self_device_time_total')
               else 'self_cuda_time_total')
    return averages.table(sort_by=key, row_limit=top, max_name_column_width=60)


def count_operators(step) -> dict:
    """The ATen operators one ``step()`` dispatches, autograd's backward included.

    Every operator costs the host its dispatch, and on a GPU nearly every one that is not
    a view launches a kernel (allocations such as ``empty`` do not), so the count tells
    what a step asks of the host. Kernels launched past ATen (Triton's, the fused
    attention's) are not counted.

    Args:
        step (Callable[[], None]): one run of the workload (already warmed up).

    Returns:
        dict[str, int]: ``operators``, those that are not views, and ``views``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):

        def __init__(self):
            super().__init__()
            self.counts = dict(operators=0, views=0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts['views' if func.is_view else 'operators'] += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        step()
    return counter.counts


def count_synchronizations(step, top: int = 5) -> dict:
    """The host's waits on the GPU during one ``step()``: how many, and from where.

    A training step whose host issues kernels faster than the GPU runs them keeps the
    GPU busy; each synchronising operation (a device-to-host copy, ``.item()``,
    ``nonzero``, a blocking host-to-device copy) makes the host wait for the queue to
    drain, and the GPU then idles while the host issues what follows. CUDA's sync debug
    mode warns at each one; the warnings are counted by the Python line they come from.

    Args:
        step (Callable[[], None]): one run of the workload on CUDA (already warmed up).
        top (int): call sites to keep, the most frequent first.

    Returns:
        dict: ``synchronizations`` (int) and ``sync_sites`` (list of
        ``'file:line xN'`` strings).
    """
    import collections
    import os
    import warnings

    import torch
    previous = torch.cuda.get_sync_debug_mode()
    sites = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if 'synchronizing CUDA operation' in str(warning.message):
            sites[f'{os.path.basename(warning.filename)}:{warning.lineno}'] += 1
    return dict(synchronizations=sum(sites.values()),
                sync_sites=[f'{site} x{count}' for site, count in sites.most_common(top)])
