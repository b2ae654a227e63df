"""stream-influence: route the points a streaming model would only memorise away from its updater."""

__version__ = "0.1.0"
