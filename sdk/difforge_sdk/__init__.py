"""difforge-sdk: the kit for plugin authors.

- :mod:`difforge_sdk.toy`: a complete tiny model family (DiT, VAE, text encoder, a converter and a
  pipeline) used by difforge's own tests and as a worked example of every hook. It is *not*
  registered through an entry point; enable it with ``DIFFORGE_PLUGINS=difforge_sdk.toy`` or
  ``difforge.reload_plugins(plugins=[difforge_sdk.toy])``.
"""

__version__ = "0.1.0"
