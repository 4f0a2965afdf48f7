"""The errors mhc_rewrite raises on purpose."""


class MHCRewriteError(RuntimeError):
    """The model cannot be converted as asked; the message says why and what to do."""


class TraceError(MHCRewriteError):
    """Neither ``torch.fx.symbolic_trace`` nor ``torch.export`` could trace the model."""
