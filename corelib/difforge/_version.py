__version__ = "0.1.0"

#: The plugin API version. A plugin declares the range it supports in its entry module
#: (``difforge_api = ">=1,<2"``) and is refused outside it.
API_VERSION = 1
