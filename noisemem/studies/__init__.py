"""The study service: specs, data and models, the chunk work, the store, and Ray.

Rooms: :mod:`~noisemem.studies.spec` (what a study computes), :mod:`~.data` and
:mod:`~.models`, :mod:`~.plan` (chunks and work items), :mod:`~.chunk` (the work of one
chunk, no Ray), :mod:`~.rows` and :mod:`~.schema` (what is written), :mod:`~.store` (where
and how), :mod:`~.devices`, and the only two that import Ray: :mod:`~.worker` (the actor)
and :mod:`~.driver` (``launch`` and the handle). Nothing here imports
:mod:`noisemem.analysis`.
"""
