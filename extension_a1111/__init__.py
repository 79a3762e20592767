"""fewstep's AUTOMATIC1111 WebUI extension: link this folder into the WebUI's ``extensions/`` (README, "A1111").

``scripts/fewstep_a1111.py`` is what the WebUI loads; it imports this package's ``run_config`` (pure: settings and
adapter metadata to run settings) and ``host`` (applies them to a run and undoes them after).
"""
