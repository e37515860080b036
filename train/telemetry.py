"""Where training telemetry goes: a small sink interface, TensorBoard on the main process
and nothing on the others."""

from __future__ import annotations

import os


class NullSink:
    """Drops everything (ranks other than the main process)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def image(self, tag: str, image, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(NullSink):
    """Scalars and images to ``<run_dir>/tb`` (TensorBoard event files)."""

    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """image: (3, H, W) float in [0, 1] or uint8."""
        self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
