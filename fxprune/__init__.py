from .analysis import Analysis, analyze
from .errors import FxpruneError
