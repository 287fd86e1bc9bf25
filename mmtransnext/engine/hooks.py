"""A progress bar for MMEngine's test (and optionally validation) loop."""
import sys
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.utils import ProgressBar


@HOOKS.register_module(force=True)
class TestProgressBarHook(Hook):
    """Show a progress bar over the batches of the test loop (main process).

    Args:
        val (bool): also show one during validation. Defaults to False.
        bar_width (int): width of the bar in characters. Defaults to 40.
    """
    priority = 'VERY_LOW'

    def __init__(self, val: bool = False, bar_width: int = 40) -> None:
        self.val = val
        self.bar_width = bar_width
        self._bar: Optional[ProgressBar] = None

    def _start(self, dataloader) -> None:
        if is_main_process():
            self._bar = ProgressBar(
                len(dataloader), bar_width=self.bar_width, file=sys.stdout)

    def _step(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.file.write('\n')
            self._bar.file.flush()
            self._bar = None

    def before_test_epoch(self, runner) -> None:
        self._start(runner.test_dataloader)

    def after_test_iter(self, runner, batch_idx, data_batch=None,
                        outputs=None) -> None:
        self._step()

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._end()

    def before_val_epoch(self, runner) -> None:
        if self.val:
            self._start(runner.val_dataloader)

    def after_val_iter(self, runner, batch_idx, data_batch=None,
                       outputs=None) -> None:
        if self.val:
            self._step()

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self.val:
            self._end()
