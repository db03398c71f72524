""":class:`SaliencyMonitor` for the standalone ``pytorch_lightning`` package's ``Trainer``.

``pytorch_lightning.Trainer`` only accepts ``pytorch_lightning.Callback`` instances, and ``lightning.pytorch``'s
``Trainer`` only its own, so the same implementation is offered on both bases::

    import pytorch_lightning as pl
    from tsm_lightning.callbacks.pl import SaliencyMonitor

    trainer = pl.Trainer(callbacks=[SaliencyMonitor(layer="backbone.7")])

``pytorch_lightning`` is the optional ``pl`` extra (``pip install 'tsm-lightning[pl]'``); only this module needs it.
"""

try:
    from pytorch_lightning import Callback
except ImportError as err:
    raise ImportError(
        "tsm_lightning.callbacks.pl needs the standalone pytorch_lightning package: pip install 'tsm-lightning[pl]' "
        "(or pip install pytorch-lightning). With the unified `lightning` package use "
        f"tsm_lightning.callbacks.SaliencyMonitor instead. ({err})"
    ) from err

from tsm_lightning.callbacks.monitor import SaliencyMonitorMixin

__all__ = ["SaliencyMonitor"]


class SaliencyMonitor(SaliencyMonitorMixin, Callback):
    """``pytorch_lightning`` flavour of :class:`tsm_lightning.callbacks.SaliencyMonitor` (same arguments)."""
