"""Errors fxprune raises. Every message names the module or graph node involved and what to do."""


class FxpruneError(Exception):
    """Base class for every error fxprune raises on purpose."""


class InvalidArgumentError(FxpruneError, ValueError):
    """An argument of a public function is out of range or of the wrong type."""


class CaptureError(FxpruneError):
    """The model could not be captured as a torch.fx graph with known shapes."""


class PlanError(FxpruneError):
    """A plan does not fit the analysed model (other architecture, stale group names, bad indices)."""


class RewriteError(FxpruneError):
    """A rewrite pass met a graph it cannot make smaller consistently (a bug: please report it)."""
