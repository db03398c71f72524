"""Lightning callbacks: :class:`SaliencyMonitor`.

``tsm_lightning.callbacks.SaliencyMonitor`` is a ``lightning.pytorch.Callback``. For the ``pytorch_lightning``
package's ``Trainer`` (lightly's examples use it) import ``tsm_lightning.callbacks.pl.SaliencyMonitor``.
"""

from tsm_lightning.callbacks.monitor import DEFAULT_EVERY_N_STEPS, SaliencyMonitor

__all__ = ["DEFAULT_EVERY_N_STEPS", "SaliencyMonitor"]
