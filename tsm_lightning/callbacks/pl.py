""":class:`SaliencyMonitor` for the standalone ``pytorch_lightning`` package's ``Trainer``.

``pytorch_lightning.Trainer`` only accepts ``pytorch_lightning.Callback`` instances, and ``lightning.pytorch``'s
``Trainer`` only its own, so the same implementation is offered on both bases::

    import pytorch_lightning as pl
    from tsm_lightning.callbacks.pl import SaliencyMonitor

    trainer = pl.Trainer(callbacks=[SaliencyMonitor(layer="backbone.7")])
"""

from pytorch_lightning import Callback

from tsm_lightning.callbacks.monitor import SaliencyMonitorMixin

__all__ = ["SaliencyMonitor"]


class SaliencyMonitor(SaliencyMonitorMixin, Callback):
    """``pytorch_lightning`` flavour of :class:`tsm_lightning.callbacks.SaliencyMonitor` (same arguments)."""
