"""difforge-sdk: the kit for plugin authors.

- :mod:`difforge_sdk.testing`: a pytest plugin (entry point ``pytest11``) with the conformance
  suites a plugin's tests opt into: ``ModelConformance`` for every ``ModelSpec``, and
  ``AttentionConformance``, ``CacheConformance``, ``OffloadConformance``, ``SchedulerConformance``.
- :mod:`difforge_sdk.tiny`: tiny configs and seeded random checkpoints of any registered model in
  any registered format; tiny tokenizers (:mod:`difforge_sdk.tiny_tokenizers`).
- :mod:`difforge_sdk.parity`: compare a module's or pipeline's output with a reference, with a report.
- :mod:`difforge_sdk.scaffold`: ``difforge new-plugin NAME --kind KIND``.
- :mod:`difforge_sdk.toy`: a complete tiny model family (DiT, VAE, text encoder, a converter and a
  pipeline) used by difforge's own tests and as a worked example of every hook. It is *not*
  registered through an entry point; enable it with ``DIFFORGE_PLUGINS=difforge_sdk.toy`` or
  ``difforge.reload_plugins(plugins=[difforge_sdk.toy])``.
- :mod:`difforge_sdk.demo`: ``make demo``.
"""

__version__ = "0.1.0"
