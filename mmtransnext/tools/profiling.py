"""One step under ``torch.profiler``, as the benchmark tools print it."""


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
